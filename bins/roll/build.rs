fn main() {
    cps_build_info::emit();
}

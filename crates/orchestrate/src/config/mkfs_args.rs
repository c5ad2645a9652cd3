//! Which mkfs arguments a configuration may carry. cps-attach passes the verified device itself
//! and formats it only after proving it empty, so an argument that forces mkfs past its own
//! refusal to overwrite, or that names another device or file to write, is refused here — in
//! every spelling getopt accepts (combined short flags `-qF`, attached values `-llogdev=…`,
//! suboption lists `-l size=64m,logdev=…`, abbreviated long options `--forc`).
//!
//! The option tables are those of e2fsprogs 1.47 (mke2fs), xfsprogs 6.1 and btrfs-progs 6.2.

/// A filesystem whose mkfs options are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Family {
    /// ext2, ext3, ext4: mke2fs.
    Ext,
    Xfs,
    Btrfs,
}

/// The getopt shape of one mkfs.
struct Syntax {
    /// Short options that take a value (getopt's `x:`).
    with_value: &'static str,
    /// Long options that take a value; the others are flags.
    long_with_value: &'static [&'static str],
    /// Options whose value is a suboption list, with the suboptions that name another device.
    device_suboptions: &'static [(char, &'static [&'static str])],
    /// Options whose value is a path mkfs writes to.
    writes_path: &'static [(char, &'static str)],
}

impl Family {
    pub(super) fn of(fstype: &str) -> Option<Self> {
        match fstype {
            "ext2" | "ext3" | "ext4" => Some(Self::Ext),
            "xfs" => Some(Self::Xfs),
            "btrfs" => Some(Self::Btrfs),
            _ => None,
        }
    }

    fn syntax(self) -> Syntax {
        match self {
            // getopt: b:cd:e:g:i:jl:m:no:qr:s:t:vC:DE:FG:I:J:KL:M:N:O:R:ST:U:Vz:
            Self::Ext => Syntax {
                with_value: "bdegilmorstCEGIJLMNORTUz",
                long_with_value: &[],
                device_suboptions: &[('J', &["device"]), ('E', &["device"])],
                writes_path: &[('z', "an undo file")],
            },
            // getopt: b:c:d:i:l:L:m:n:KNp:qr:s:CfV
            Self::Xfs => Syntax {
                with_value: "bcdilLmnprs",
                long_with_value: &[],
                device_suboptions: &[
                    ('d', &["name"]),
                    ('l', &["logdev", "name"]),
                    ('r', &["rtdev", "name"]),
                ],
                writes_path: &[],
            },
            // getopt: A:b:fl:n:s:m:d:L:R:O:r:U:VvMKq, and long options.
            Self::Btrfs => Syntax {
                with_value: "AblnsmdLROrU",
                long_with_value: &[
                    "alloc-start",
                    "byte-count",
                    "checksum",
                    "compress",
                    "csum",
                    "data",
                    "device-uuid",
                    "features",
                    "inode-flags",
                    "label",
                    "leafsize",
                    "metadata",
                    "nodesize",
                    "rootdir",
                    "runtime-features",
                    "sectorsize",
                    "subvol",
                    "uuid",
                ],
                device_suboptions: &[],
                writes_path: &[],
            },
        }
    }
}

/// What is wrong with argument number `index`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Problem {
    pub index: usize,
    pub message: String,
}

fn problem(index: usize, message: String) -> Problem {
    Problem { index, message }
}

/// An argument in a message: as it is when it is short and plain, quoted otherwise.
fn show_arg(text: &str) -> String {
    if text.len() <= 80 && !text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        text.to_owned()
    } else {
        super::rules::shown(text)
    }
}

fn forced(index: usize, arg_text: &str, flag: &str) -> Problem {
    let includes = if arg_text == flag {
        String::new()
    } else {
        format!(" includes {flag}, which")
    };
    problem(
        index,
        format!(
            "mkfs option {}{includes} forces overwriting existing data; cps-attach only formats \
             devices it proved empty, so remove it",
            show_arg(arg_text)
        ),
    )
}

fn needs_value(index: usize, option: &str) -> Problem {
    problem(
        index,
        format!(
            "mkfs option {option} needs a value and none follows: mkfs would take the device's \
             name as its value; add the value or remove the option"
        ),
    )
}

/// The first problem with the arguments a `family` mkfs gets before the device; `args` are
/// `(index, argument)`, indices into what the user wrote.
pub(super) fn check(family: Family, args: &[(usize, &str)]) -> Result<(), Problem> {
    let syntax = family.syntax();
    let mut rest = args.iter();
    while let Some(&(index, arg)) = rest.next() {
        if arg == "--" {
            // Everything after it is a device name.
            return match rest.next() {
                Some(&(i, a)) => Err(positional(i, a)),
                None => Ok(()),
            };
        }
        if arg == "-" || !arg.starts_with('-') {
            return Err(positional(index, arg));
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            // getopt_long takes any unambiguous prefix: --forc is --force.
            if !name.is_empty() && "force".starts_with(name) {
                return Err(forced(index, arg, "--force"));
            }
            let takes_value = {
                let exact = syntax.long_with_value.contains(&name);
                let prefixed: Vec<_> = syntax
                    .long_with_value
                    .iter()
                    .filter(|l| l.starts_with(name))
                    .collect();
                exact || prefixed.len() == 1
            };
            if takes_value && inline.is_none() && rest.next().is_none() {
                return Err(needs_value(index, arg));
            }
            continue;
        }
        // A group of short options: flags, then at most one option with its value, attached
        // (`-m0`, `-llogdev=…`) or in the next argument.
        let group: Vec<char> = arg[1..].chars().collect();
        for (k, &c) in group.iter().enumerate() {
            if c == 'f' || c == 'F' {
                return Err(forced(index, arg, &format!("-{c}")));
            }
            if !syntax.with_value.contains(c) {
                continue;
            }
            let attached: String = group[k + 1..].iter().collect();
            let (value_index, value) = if attached.is_empty() {
                match rest.next() {
                    Some(&(i, v)) => (i, v.to_owned()),
                    None => return Err(needs_value(index, &format!("-{c}"))),
                }
            } else {
                (index, attached)
            };
            check_value(&syntax, c, &value, value_index)?;
            break;
        }
    }
    Ok(())
}

/// The value of short option `-c`: a suboption list naming another device, or a path written.
fn check_value(syntax: &Syntax, c: char, value: &str, index: usize) -> Result<(), Problem> {
    if let Some((_, what)) = syntax.writes_path.iter().find(|(o, _)| *o == c) {
        return Err(problem(
            index,
            format!(
                "mkfs option -{c} writes {what} to {}: cps-attach writes only to the volume it \
                 verified, never to another device or file; remove it",
                show_arg(value)
            ),
        ));
    }
    let Some((_, names)) = syntax.device_suboptions.iter().find(|(o, _)| *o == c) else {
        return Ok(());
    };
    for sub in value.split(',') {
        let name = sub.split('=').next().unwrap_or(sub);
        if names.contains(&name) {
            return Err(problem(
                index,
                format!(
                    "mkfs option -{c} {} puts part of the filesystem on another device ({}); \
                     cps-attach writes only to the volume it verified, so remove it (external \
                     journals, logs and realtime devices are not supported)",
                    show_arg(value),
                    show_arg(sub)
                ),
            ));
        }
    }
    Ok(())
}

fn positional(index: usize, text: &str) -> Problem {
    problem(
        index,
        format!(
            "mkfs argument {} is not an option: cps-attach gives mkfs the verified device itself, \
             and another device named here would be written to as well (mkfs.btrfs formats every \
             device it is given); remove it, or if it is an option's value, put it right after \
             that option",
            show_arg(text)
        ),
    )
}

/// The raw `mkfs` list: the wrapper's `-t TYPE` (which `MkfsSpec::fstype` reads), then the
/// chosen mkfs's own arguments. `fstype` is what the spec makes.
pub(super) fn check_raw(args: &[String], fstype: &str) -> Result<(), Problem> {
    let mut rest: Vec<(usize, &str)> = Vec::new();
    let mut type_seen = false;
    let mut it = args.iter().map(String::as_str).enumerate();
    while let Some((i, arg)) = it.next() {
        if !type_seen && (arg == "-t" || arg == "--type") {
            match it.next() {
                Some((_, t)) if !t.starts_with('-') && !t.is_empty() => {}
                _ => {
                    return Err(problem(
                        i,
                        format!(
                            "mkfs option {arg} needs a value: the filesystem type (ext4, xfs, \
                             btrfs); without one mkfs would take the device's name as the type"
                        ),
                    ));
                }
            }
            type_seen = true;
        } else if !type_seen
            && (arg.starts_with("--type=") || (arg.starts_with("-t") && arg.len() > 2))
        {
            type_seen = true;
        } else {
            rest.push((i, arg));
        }
    }
    match Family::of(fstype) {
        Some(family) => check(family, &rest),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(family: Family, args: &[&str]) -> Result<(), Problem> {
        let indexed: Vec<(usize, &str)> = args.iter().copied().enumerate().collect();
        check(family, &indexed)
    }

    #[test]
    fn problems_name_the_argument_at_fault() {
        assert_eq!(
            run(Family::Xfs, &["-K", "-l", "size=1m,logdev=/dev/sdb"])
                .unwrap_err()
                .index,
            2
        );
        assert_eq!(run(Family::Ext, &["-m", "0", "-qF"]).unwrap_err().index, 2);
        let e = run(Family::Ext, &["-qF"]).unwrap_err().message;
        assert!(e.contains("-qF includes -F, which forces"), "{e}");
    }

    #[test]
    fn a_value_is_never_read_as_flags() {
        // `-L fF` is a label, `-E f` an extended option list, `-m0` a value.
        assert_eq!(run(Family::Ext, &["-L", "-fF", "-E", "f", "-m0"]), Ok(()));
        assert_eq!(run(Family::Btrfs, &["--label", "-f", "--label=x"]), Ok(()));
        assert_eq!(run(Family::Xfs, &["-Lf"]), Ok(()));
    }

    #[test]
    fn the_raw_type_is_the_wrappers() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(check_raw(&args(&["-t", "ext4", "-m", "0"]), "ext4"), Ok(()));
        assert_eq!(check_raw(&args(&["-txfs", "-K"]), "xfs"), Ok(()));
        assert_eq!(
            check_raw(&args(&["-t", "vfat", "-F", "32"]), "vfat"),
            Ok(())
        );
        assert_eq!(check_raw(&args(&["-t"]), "ext2").unwrap_err().index, 0);
        assert_eq!(check_raw(&args(&["-t", "-F"]), "-F").unwrap_err().index, 0);
        // A second -t is mke2fs's own, and needs its value too.
        assert_eq!(
            check_raw(&args(&["-t", "ext4", "-t"]), "ext4")
                .unwrap_err()
                .index,
            2
        );
    }
}

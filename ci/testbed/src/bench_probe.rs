//! What proving a device blank costs: `LinuxHost::probe` on blank sparse loop devices from
//! 1 GiB to 15 TiB — blkid and wipefs, then the backup superblocks, both ends and the spread
//! sample — beside blkid and wipefs alone on the same device.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Instant;

use cps_blockdev::{BlockHost, Device, LinuxHost, Probe, Verification, blank_check_cost};
use cps_fixtures::LoopDevice;

const SIZES: [(&str, u64); 4] = [
    ("1 GiB", 1 << 30),
    ("100 GiB", 100 << 30),
    ("1 TiB", 1 << 40),
    ("15 TiB", 15 << 40),
];
/// Runs per size; the median is reported.
const RUNS: usize = 5;

pub fn run() -> io::Result<()> {
    println!("## Proving a blank device blank\n");
    println!(
        "`LinuxHost::probe` on a blank sparse loop device (page cache warm after the first run; \
         median of {RUNS}). *Signatures* is blkid and wipefs alone; *probe* adds the backup \
         superblocks, both ends and the spread sample.\n"
    );
    println!("| device | reads | bytes read | signatures | probe | verdict |");
    println!("|---|---|---|---|---|---|");
    let host = LinuxHost::default();
    for (name, size) in SIZES {
        let l = LoopDevice::new(size)?;
        let device = Device {
            path: l.path().to_path_buf(),
            rdev: std::fs::metadata(l.path())?.rdev(),
            volume_id: "vol-0bench".into(),
            verification: Verification::XenName,
        };
        let (reads, bytes) = blank_check_cost(size);
        let signatures = median(RUNS, || {
            for tool in [
                vec!["blkid", "-p", "-o", "export"],
                vec!["wipefs", "--no-act"],
            ] {
                Command::new(tool[0])
                    .args(&tool[1..])
                    .arg(l.path())
                    .output()?;
            }
            Ok(())
        })?;
        let mut verdict = None;
        let probe = median(RUNS, || {
            verdict = Some(host.probe(&device).map_err(io::Error::other)?);
            Ok(())
        })?;
        let verdict = match verdict {
            Some(Probe::Empty) => "empty".to_owned(),
            other => format!("{other:?}"),
        };
        println!(
            "| {name} | {reads} | {:.1} MiB | {:.3} s | {:.3} s | {verdict} |",
            bytes as f64 / f64::from(1 << 20),
            signatures,
            probe
        );
    }
    println!(
        "\nThe reads are bounded whatever the size: 1024 spread samples of 64 KiB, the first and \
         last MiB, and a few hundred 512-byte to 4 KiB reads where ext2/3/4, xfs and btrfs keep \
         superblock copies.\n"
    );
    Ok(())
}

fn median(runs: usize, mut f: impl FnMut() -> io::Result<()>) -> io::Result<f64> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        f()?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

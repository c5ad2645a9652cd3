//! Proving a device blank when blkid and wipefs found no signature.
//!
//! Both tools read primary signatures only, so a filesystem whose first MiB was zeroed (a
//! stray `dd`, a failed partitioning tool) looks empty to them although it is a damaged
//! filesystem that `e2fsck -b`, `xfs_repair` or `btrfs rescue` can bring back. Filesystems keep
//! copies of their superblock at known places; those are read first. Then both ends of the
//! device, then an evenly spread sample across all of it: anything that is not zero means
//! "not empty". The number of reads is bounded whatever the size (see [`SAMPLES`]).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// What makes a device not blank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// A backup superblock of a filesystem whose primary one is gone.
    Backup {
        fstype: &'static str,
        offset: u64,
        recover: String,
    },
    /// Non-zero bytes that carry no signature we know.
    Data { offset: u64 },
}

/// Bytes checked for zeros at each end of the device.
const END_BYTES: u64 = 1 << 20;
/// Reads spread evenly over the device, and the bytes of each: at most 64 MiB in all, so the
/// cost is bounded on any size; a run of data longer than `size / SAMPLES` is always hit.
pub(crate) const SAMPLES: u64 = 1024;
pub(crate) const SAMPLE_BYTES: u64 = 64 << 10;

/// The first thing on the device that is not zeros, or `None` when every place looked at is.
/// `dev` names the device in recovery hints.
pub(crate) fn find_data(file: &File, size: u64, dev: &str) -> std::io::Result<Option<Found>> {
    if let Some(found) = backup_superblock(file, size, dev)? {
        return Ok(Some(found));
    }
    let head = END_BYTES.min(size);
    let tail = size.saturating_sub(END_BYTES).max(head);
    for (start, len) in [(0, head), (tail, size - tail)] {
        if let Some(offset) = nonzero_in(file, start, len)? {
            return Ok(Some(Found::Data { offset }));
        }
    }
    for (start, len) in sample_ranges(size) {
        if let Some(offset) = nonzero_in(file, start, len)? {
            return Ok(Some(Found::Data { offset }));
        }
    }
    Ok(None)
}

/// How many reads, of how many bytes in all, the blank check makes on a blank device of `size`
/// bytes (at most): the bound the benchmark reports.
pub fn blank_check_cost(size: u64) -> (usize, u64) {
    let superblocks: Vec<(u64, u64)> = ext_backups(size)
        .into_iter()
        .map(|(at, _)| (at, 1024))
        .chain(xfs_secondaries(size).into_iter().map(|(at, _)| (at, 512)))
        .chain(
            BTRFS_MIRRORS
                .into_iter()
                .filter(|&at| at + 4096 <= size)
                .map(|at| (at, 4096)),
        )
        .collect();
    let ends = [
        END_BYTES.min(size),
        END_BYTES.min(size.saturating_sub(END_BYTES)),
    ];
    let sample = sample_ranges(size);
    let reads = superblocks.len() + ends.iter().filter(|&&n| n > 0).count() + sample.len();
    let bytes = superblocks.iter().map(|r| r.1).sum::<u64>()
        + ends.iter().sum::<u64>()
        + sample.iter().map(|r| r.1).sum::<u64>();
    (reads, bytes)
}

/// The ranges of the spread sample: the whole device when it is small, else [`SAMPLES`]
/// ranges of [`SAMPLE_BYTES`], 4 KiB-aligned, from the start to the end.
pub(crate) fn sample_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= SAMPLES * SAMPLE_BYTES {
        return vec![(0, size)];
    }
    let span = size - SAMPLE_BYTES;
    (0..SAMPLES)
        .map(|i| {
            // u128: i * span overflows u64 for devices above 16 PiB / 1024.
            let at = (u128::from(i) * u128::from(span) / u128::from(SAMPLES - 1)) as u64;
            (at & !4095, SAMPLE_BYTES)
        })
        .collect()
}

/// The offset of the first non-zero byte in `len` bytes at `start`, read in 1 MiB pieces.
fn nonzero_in(file: &File, start: u64, len: u64) -> std::io::Result<Option<u64>> {
    let piece = len.min(1 << 20) as usize;
    let (mut buf, zeros) = (vec![0u8; piece], vec![0u8; piece]);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(piece as u64) as usize;
        file.read_exact_at(&mut buf[..n], start + done)?;
        // Slice equality is a memcmp: fast even unoptimised; the position only when it fails.
        if buf[..n] != zeros[..n] {
            let i = buf[..n].iter().position(|&b| b != 0).unwrap_or(0);
            return Ok(Some(start + done + i as u64));
        }
        done += n as u64;
    }
    Ok(None)
}

fn read_at(file: &File, offset: u64, len: usize, size: u64) -> std::io::Result<Option<Vec<u8>>> {
    if offset + len as u64 > size {
        return Ok(None);
    }
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(Some(buf))
}

fn backup_superblock(file: &File, size: u64, dev: &str) -> std::io::Result<Option<Found>> {
    for (offset, bs) in ext_backups(size) {
        if let Some(sb) = read_at(file, offset, 1024, size)?
            && sb[56..58] == [0x53, 0xef]
            && u32::from_le_bytes(sb[24..28].try_into().expect("4 bytes")) == bs.ilog2() - 10
        {
            let block = offset / bs;
            return Ok(Some(Found::Backup {
                fstype: "ext2/3/4",
                offset,
                recover: format!(
                    "It can be opened from this backup: check it with `e2fsck -n -b {block} -B {bs} {dev}`, \
                     repair it with `e2fsck -b {block} -B {bs} {dev}`"
                ),
            }));
        }
    }
    for (offset, bs) in xfs_secondaries(size) {
        if let Some(sb) = read_at(file, offset, 512, size)?
            && &sb[0..4] == b"XFSB"
            && u32::from_be_bytes(sb[4..8].try_into().expect("4 bytes")) == bs as u32
        {
            return Ok(Some(Found::Backup {
                fstype: "xfs",
                offset,
                recover: format!(
                    "xfs_repair finds the secondary superblocks and restores the primary: check with \
                     `xfs_repair -n {dev}`, repair with `xfs_repair {dev}`"
                ),
            }));
        }
    }
    for offset in BTRFS_MIRRORS {
        if let Some(sb) = read_at(file, offset, 4096, size)?
            && &sb[0x40..0x48] == b"_BHRfS_M"
        {
            return Ok(Some(Found::Backup {
                fstype: "btrfs",
                offset,
                recover: format!(
                    "btrfs restores the primary from its mirrors with `btrfs rescue super-recover {dev}`"
                ),
            }));
        }
    }
    Ok(None)
}

/// Where ext2/3/4 keep backup superblocks, with the block size each place belongs to: the start
/// of block groups 1, 3, 5, 7, 9, 25, 27, 49… (sparse_super), for every block size mke2fs makes,
/// with the default 8 × block size blocks per group (1 KiB blocks start at block 1).
fn ext_backups(size: u64) -> Vec<(u64, u64)> {
    let mut groups: Vec<u64> = vec![1];
    for base in [3u64, 5, 7] {
        let mut g = base;
        while g < 1 << 20 {
            groups.push(g);
            g *= base;
        }
    }
    groups.sort_unstable();
    let mut out = Vec::new();
    for log in 10..=16u32 {
        let bs = 1u64 << log;
        let first = u64::from(bs == 1024);
        for &g in &groups {
            let offset = (first + g * 8 * bs) * bs;
            if offset + 1024 > size {
                break;
            }
            out.push((offset, bs));
            // The first few groups are enough: a damage that reaches group 25 is not one an
            // empty-looking start can hide, and the sample covers the rest.
            if g >= 27 {
                break;
            }
        }
    }
    out
}

/// Where xfs puts allocation group 1's superblock, with the block size it belongs to. mkfs.xfs
/// gives a single disk 4 groups below 4 TiB and 1 TiB groups above; striped devices get more;
/// `-d agcount=` any. Group size is `ceil(blocks / count)`, so every count from 2 to 64 is
/// tried, for every block size, plus the largest group size.
fn xfs_secondaries(size: u64) -> Vec<(u64, u64)> {
    const MIN_AG_BYTES: u64 = 16 << 20;
    let mut out = Vec::new();
    for log in 9..=16u32 {
        let bs = 1u64 << log;
        let blocks = size / bs;
        let max_ag_blocks = ((1u64 << 40) - 1) >> log;
        let mut sizes: Vec<u64> = (2..=64u64).map(|count| blocks.div_ceil(count)).collect();
        sizes.push(max_ag_blocks);
        for ag_blocks in sizes {
            let offset = ag_blocks * bs;
            if ag_blocks <= max_ag_blocks && offset >= MIN_AG_BYTES && offset + 512 <= size {
                out.push((offset, bs));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// btrfs mirrors its superblock at 64 MiB, 256 GiB and 1 PiB.
const BTRFS_MIRRORS: [u64; 3] = [64 << 20, 256 << 30, 1 << 50];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext_backups_sit_at_the_starts_of_groups_1_3_5_7() {
        let places = ext_backups(1 << 40);
        assert!(places.contains(&(8193 * 1024, 1024)));
        assert!(places.contains(&(3 * 8192 * 1024 + 1024, 1024)));
        assert!(places.contains(&(16384 * 2048, 2048)));
        assert!(places.contains(&(32768 * 4096, 4096)));
        assert!(places.contains(&(5 * 32768 * 4096, 4096)));
        assert!(
            ext_backups(4 << 20).is_empty(),
            "no group 1 on a 4 MiB device"
        );
    }

    #[test]
    fn xfs_group_one_follows_mkfs_arithmetic() {
        // mkfs.xfs on 314,585,088 bytes: 76,803 blocks of 4 KiB, 4 groups of 19,201.
        assert!(xfs_secondaries(314_585_088).contains(&(19_201 * 4096, 4096)));
        // 5 TiB: 1 TiB groups of 2^28 - 1 blocks.
        assert!(xfs_secondaries(5 << 40).contains(&(((1 << 28) - 1) * 4096, 4096)));
        // -d agcount=7 on 1 GiB: groups of 37,450 blocks.
        assert!(xfs_secondaries(1 << 30).contains(&(37_450 * 4096, 4096)));
    }

    #[test]
    fn the_sample_is_bounded_spread_and_aligned() {
        let size = 16u64 << 40;
        let ranges = sample_ranges(size);
        assert_eq!(ranges.len() as u64, SAMPLES);
        assert_eq!(ranges[0].0, 0);
        let (last, len) = *ranges.last().unwrap();
        assert!(last + len <= size && last + len > size - 8192);
        assert!(ranges.iter().all(|(at, _)| at % 4096 == 0));
        let gap = ranges[1].0 - ranges[0].0;
        assert!(gap <= size / (SAMPLES - 1));
        assert_eq!(sample_ranges(32 << 20), vec![(0, 32 << 20)]);
    }
}

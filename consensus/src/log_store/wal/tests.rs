//! The segment log's stories: what was acknowledged survives restarts, rolls and purges; what a
//! crash tore is dropped and never comes back; damage and missing files refuse to open.

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::RaftLogStorageExt;
use openraft::type_config::TypeConfigExt;

use super::segment::LOCKED;
use super::*;
use crate::log_store::tail::tests::indexes as ids;
use crate::types::LogCommand;

/// Small segments, so that a few dozen entries span several.
const SMALL: u64 = 8 << 10;

fn entry(term: u64, index: u64) -> Entry {
    let command = LogCommand {
        stamped_ms: index,
        command: vec![term as u8; 200],
    };
    Entry::new_normal(LogId::new(LeaderId { term, node_id: 1 }, index), command)
}

fn open(dir: &Path) -> WalLogStore {
    WalLogStore::open_with(dir, StorageHealth::default(), SMALL).expect("open the log")
}

fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    segment::list(dir).unwrap()
}

async fn all(log: &mut WalLogStore) -> Vec<(u64, u64)> {
    ids(&log.try_get_log_entries(0..).await.unwrap())
}

/// Why opening the log in `dir` is refused (it must be).
fn refusal(dir: &Path) -> String {
    match WalLogStore::open_with(dir, StorageHealth::default(), SMALL) {
        Ok(_) => panic!("the log in {} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Changes one byte of a file, as damage on the disk would.
fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, &bytes).unwrap();
}

/// A log in `dir` holding entries 1..=n of term 1, closed.
async fn closed_log(dir: &Path, n: u64) {
    let mut log = open(dir);
    append(&mut log, 1, 1..=n).await;
}

async fn append(log: &mut WalLogStore, term: u64, indexes: std::ops::RangeInclusive<u64>) {
    log.blocking_append(indexes.map(|i| entry(term, i)))
        .await
        .unwrap();
}

#[tokio::test]
async fn what_was_acknowledged_is_there_after_a_restart_in_the_order_it_was_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    // Far more entries than the tail keeps: the old ones are read back from the segments.
    let n = TAIL_KEEP.entries as u64 * 3;
    append(&mut log, 1, 1..=n - 10).await;
    let (tx, flushed) = TypeConfig::oneshot();
    log.append((n - 9..=n).map(|i| entry(1, i)), IOFlushed::signal(tx))
        .await
        .unwrap();
    let want: Vec<_> = (1..=n).map(|i| (1, i)).collect();
    assert_eq!(all(&mut log).await, want);
    // A new leader's entries replace the old ones after 5 (asked while the last append may still
    // be on its way to the disk: it must not come back); then the first 2 are purged.
    log.truncate_after(Some(entry(1, 5).log_id()))
        .await
        .unwrap();
    flushed.await.unwrap().unwrap();
    append(&mut log, 2, 6..=7).await;
    log.purge(entry(1, 2).log_id()).await.unwrap();
    let want = [(1, 3), (1, 4), (1, 5), (2, 6), (2, 7)];
    assert_eq!(all(&mut log).await, want);
    drop(log);

    let mut log = open(dir.path());
    assert_eq!(all(&mut log).await, want);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(entry(2, 7).log_id()));
    assert_eq!(state.last_purged_log_id, Some(entry(1, 2).log_id()));
}

#[tokio::test]
async fn an_entry_is_readable_as_soon_as_it_is_appended_and_acknowledged_once_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    let (tx, flushed) = TypeConfig::oneshot();
    log.append([entry(1, 1), entry(1, 2)], IOFlushed::signal(tx))
        .await
        .unwrap();
    // Readers (replication) find the entries at once, whether or not the fsync is done.
    assert_eq!(all(&mut log).await, [(1, 1), (1, 2)]);
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(entry(1, 2).log_id())
    );
    flushed.await.unwrap().unwrap();
    drop(log);
    let mut log = open(dir.path());
    assert_eq!(all(&mut log).await, [(1, 1), (1, 2)]);
}

#[test]
fn a_follower_writes_what_its_leader_sent_in_place_only_when_nothing_is_queued() {
    use Place::*;
    // (this log's replica, the entries' leader, ops queued, multi-threaded runtime) -> place
    let table = [
        (Some(2), Some(1), 0, true, InPlace),
        (Some(1), Some(1), 0, true, Queued), // a leader's own entries: replication runs beside
        (Some(2), Some(1), 1, true, Queued), // after what was asked for earlier
        (Some(2), Some(1), 0, false, Queued), // nowhere to lend this worker's other tasks
        (None, Some(1), 0, true, Queued),    // a log that does not know its replica
        (Some(2), None, 0, true, Queued),    // nothing to write
    ];
    for (replica, leader, queued, multi, want) in table {
        assert_eq!(
            Place::of(replica, leader, queued, multi),
            want,
            "replica {replica:?}, leader {leader:?}, {queued} queued, multi-threaded {multi}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_acknowledges_its_leaders_entries_on_disk_before_append_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path()).of_replica(2);
    let (tx, mut flushed) = TypeConfig::oneshot();
    log.append([entry(1, 1), entry(1, 2)], IOFlushed::signal(tx))
        .await
        .unwrap();
    // Written in place: the callback came before append returned.
    assert!(matches!(flushed.try_recv(), Ok(Ok(_))), "not yet on disk");
    drop(log);
    let mut log = open(dir.path());
    assert_eq!(all(&mut log).await, [(1, 1), (1, 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaders_own_entries_and_whatever_follows_a_queued_op_go_through_the_fsync_thread() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path()).of_replica(1);
    // The writer held by another thread: nothing is written until it is let go.
    let (let_go, held) = hold(log.flusher.writer.clone());
    let (tx, mut own) = TypeConfig::oneshot();
    log.append([entry(1, 1)], IOFlushed::signal(tx))
        .await
        .unwrap();
    assert!(
        own.try_recv().is_err(),
        "replica 1's own entry was not queued"
    );
    // Replica 1 following replica 2 now: queued too, behind entry 1 (in place it would wait for
    // the writer here).
    let followed = Entry::new_normal(
        LogId::new(
            LeaderId {
                term: 2,
                node_id: 2,
            },
            2,
        ),
        LogCommand {
            stamped_ms: 2,
            command: vec![2; 200],
        },
    );
    let (tx, mut then) = TypeConfig::oneshot();
    let mut clone = log.clone();
    let appended = tokio::spawn(async move {
        clone
            .append([followed], IOFlushed::signal(tx))
            .await
            .unwrap();
    });
    tokio::time::timeout(Duration::from_secs(5), appended)
        .await
        .expect("the append behind a queued one waited for the writer in place")
        .unwrap();
    assert!(
        then.try_recv().is_err(),
        "written before the entry queued ahead of it"
    );
    drop(let_go);
    held.join().unwrap();
    own.await.unwrap().unwrap();
    then.await.unwrap().unwrap();
    drop(log);
    let mut log = open(dir.path());
    assert_eq!(all(&mut log).await, [(1, 1), (2, 2)]);
}

/// Holds `writer` on a thread of its own until the returned sender is dropped.
fn hold(writer: Arc<Mutex<Writer>>) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (let_go, wait) = std::sync::mpsc::channel::<()>();
    let (taken, is_taken) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let _held = lock(&writer);
        taken.send(()).unwrap();
        let _ = wait.recv();
    });
    is_taken.recv().unwrap();
    (let_go, holder)
}

/// Whether this process holds `path` open with `O_DIRECT` (Linux's `/proc/self/fdinfo` flags).
fn open_direct(path: &Path) -> bool {
    let want = path.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .any(|fd| {
            let same = std::fs::read_link(fd.path()).is_ok_and(|p| p == want);
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ));
            let flags = info.ok().and_then(|i| {
                i.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            });
            same && flags.is_some_and(|f| f & libc::O_DIRECT as u32 != 0)
        })
}

#[tokio::test]
async fn groups_go_to_disk_directly_where_the_filesystem_takes_it_and_through_the_page_cache_when_asked(
) {
    let dir = tempfile::tempdir().unwrap();
    if !super::direct::takes_direct_writes(dir.path()) {
        eprintln!("skipped: {} takes no O_DIRECT writes", dir.path().display());
        return;
    }
    for (io, direct) in [(Io::Direct, true), (Io::PageCache, false)] {
        let dir = tempfile::tempdir().unwrap();
        let mut log =
            WalLogStore::open_io(dir.path(), StorageHealth::default(), SMALL, io).unwrap();
        // Across a roll: the next segment is opened the same way.
        append(&mut log, 1, 1..=60).await;
        assert!(segments(dir.path()).len() > 1, "{io:?}");
        assert_eq!(open_direct(&newest(dir.path())), direct, "{io:?}");
        drop(log);
        let mut log = open(dir.path());
        assert_eq!(
            all(&mut log).await,
            (1..=60).map(|i| (1, i)).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn a_failed_replica_refuses_appends_and_votes_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let health = StorageHealth::default();
    let mut log = WalLogStore::open_with(dir.path(), health.clone(), SMALL).unwrap();
    health.fail("disk gone (injected)");
    let e = log.blocking_append([entry(1, 1)]).await.unwrap_err();
    assert!(e.to_string().contains("disk gone"), "{e}");
    let e = log.save_vote(&Vote::new(1, 1)).await.unwrap_err();
    assert!(e.to_string().contains("disk gone"), "{e}");
    assert!(all(&mut log).await.is_empty());
}

#[tokio::test]
async fn the_vote_and_purge_point_outlive_the_segments_they_were_written_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.save_vote(&Vote::new(3, 2)).await.unwrap();
    log.save_committed(Some(entry(3, 1).log_id()))
        .await
        .unwrap();
    append(&mut log, 3, 1..=200).await;
    let before = segments(dir.path());
    assert!(
        before.len() > 5,
        "200 entries span several segments: {before:?}"
    );
    // Purging all but the last few deletes every segment but the newest ones (after the purge is
    // answered: dropping the store waits for its fsync thread).
    log.purge(entry(3, 190).log_id()).await.unwrap();
    drop(log);
    let after = segments(dir.path());
    assert!(after.len() < 3, "purged segments deleted: {after:?}");
    assert_eq!(after.last(), before.last());

    let mut log = open(dir.path());
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
    assert_eq!(
        log.read_committed().await.unwrap(),
        Some(entry(3, 1).log_id())
    );
    assert_eq!(
        all(&mut log).await,
        (191..=200).map(|i| (3, i)).collect::<Vec<_>>()
    );
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(entry(3, 190).log_id()));
}

/// Bytes of the newest segment, for a test to tear.
fn newest(dir: &Path) -> PathBuf {
    segments(dir).pop().unwrap().1
}

/// Where each entry's record lies in the newest segment (by reading the file as recovery does).
fn offsets(path: &Path) -> Vec<(u64, std::ops::Range<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while let Read::Record(rec, len) = record::read(&bytes[at..]) {
        if let Record::Entry(e) = rec {
            out.push((e.index(), at..at + len));
        }
        at += len;
    }
    out
}

/// A log holding 1 and 2 (one group), then 3 with a command large enough to span several sectors
/// (a group of its own); returns the newest segment and where 3's record lies.
async fn log_with_a_long_last_record(dir: &Path) -> (PathBuf, std::ops::Range<usize>) {
    let mut log = open(dir);
    append(&mut log, 1, 1..=2).await;
    let command = LogCommand {
        stamped_ms: 3,
        command: vec![7; 3000],
    };
    let long = Entry::new_normal(
        LogId::new(
            LeaderId {
                term: 1,
                node_id: 1,
            },
            3,
        ),
        command,
    );
    log.blocking_append([long]).await.unwrap();
    drop(log);
    let path = newest(dir);
    let (index, range) = offsets(&path).pop().unwrap();
    assert_eq!(index, 3);
    (path, range)
}

#[tokio::test]
async fn a_torn_last_group_is_dropped_and_nothing_after_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (path, range) = log_with_a_long_last_record(dir.path()).await;
    // A crash while 3 was being written: its last sector never reached the disk (it is still the
    // zeros the segment was made of); the ones before it did.
    let mut bytes = std::fs::read(&path).unwrap();
    let last_sector = (range.end - 1) / 512 * 512;
    assert!(last_sector > range.start + 8, "the header landed");
    bytes[last_sector..range.end].fill(0);
    std::fs::write(&path, &bytes).unwrap();

    let mut log = open(dir.path());
    assert_eq!(all(&mut log).await, [(1, 1), (1, 2)]);
    // The log goes on after 2; a shorter record now lies where 3 began. Whatever 3 left past it
    // was zeroed, so no stale bytes can be read as a record after a restart.
    let blank = Entry::new_blank(LogId::new(
        LeaderId {
            term: 2,
            node_id: 1,
        },
        3,
    ));
    log.blocking_append([blank]).await.unwrap();
    drop(log);
    let bytes = std::fs::read(&path).unwrap();
    let end = offsets(&path).last().unwrap().1.end;
    assert!(
        bytes[end..].iter().all(|b| *b == 0),
        "nothing after the last record"
    );
    let mut log = open(dir.path());
    assert_eq!(all(&mut log).await, [(1, 1), (1, 2), (2, 3)]);
}

#[tokio::test]
async fn damage_in_the_newest_segment_is_not_taken_for_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (path, range) = log_with_a_long_last_record(dir.path()).await;
    // One byte of 3 changed, every sector of it written: no crash does that.
    flip(&path, range.start + 100);
    let msg = refusal(dir.path());
    assert!(
        msg.contains(&format!("at byte {}", range.start)) && msg.contains("every sector written"),
        "{msg}"
    );
}

#[tokio::test]
async fn damage_in_an_older_segment_refuses_to_open_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    closed_log(dir.path(), 100).await;
    let first = segments(dir.path()).remove(0).1;
    flip(&first, 600);
    let msg = refusal(dir.path());
    assert!(
        msg.contains(&segment::name(1)) && msg.contains("at byte"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_missing_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    closed_log(dir.path(), 100).await;
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    std::fs::remove_file(&segs[1].1).unwrap();
    let msg = refusal(dir.path());
    assert!(msg.contains("but has entry"), "{msg}");
}

#[tokio::test]
async fn segments_left_by_an_interrupted_purge_are_deleted_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    append(&mut log, 1, 1..=100).await;
    let segs = segments(dir.path());
    // The purge's record is on disk, and of the two files it frees only the second's deletion
    // landed before the crash.
    let keep = std::fs::read(&segs[0].1).unwrap();
    log.purge(entry(1, 70).log_id()).await.unwrap();
    drop(log);
    assert!(!segs[0].1.exists() && !segs[1].1.exists());
    std::fs::write(&segs[0].1, keep).unwrap();

    let mut log = open(dir.path());
    assert_eq!(
        all(&mut log).await,
        (71..=100).map(|i| (1, i)).collect::<Vec<_>>()
    );
    drop(log);
    assert!(!segs[0].1.exists(), "the leftover is deleted");
}

#[tokio::test]
async fn a_crash_right_after_a_new_segment_was_renamed_in_leaves_a_usable_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.save_vote(&Vote::new(1, 1)).await.unwrap();
    append(&mut log, 1, 1..=5).await;
    drop(log);
    // The next segment is in place, all zeros: not a byte of it was written.
    let (seq, _) = segments(dir.path()).pop().unwrap();
    segment::create_zeroed(&dir.path().join(segment::name(seq + 1)), SMALL).unwrap();
    // And a spare half made.
    std::fs::write(dir.path().join("spare.tmp"), b"half").unwrap();

    let mut log = open(dir.path());
    assert_eq!(
        all(&mut log).await,
        (1..=5).map(|i| (1, i)).collect::<Vec<_>>()
    );
    append(&mut log, 1, 6..=6).await;
    drop(log);
    assert!(!dir.path().join("spare.tmp").exists());
    let mut log = open(dir.path());
    assert_eq!(all(&mut log).await.len(), 6);
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(1, 1)));
}

#[tokio::test]
async fn a_second_store_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _log = open(dir.path());
    let msg = refusal(dir.path());
    assert!(msg.contains(LOCKED), "{msg}");
}

#[tokio::test]
async fn an_old_rocksdb_log_is_migrated_once_with_its_vote_and_purge_point() {
    let data = tempfile::tempdir().unwrap();
    let legacy = data.path().join(migrate::LEGACY_DIR);
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = rocksdb::DB::open_cf(&opts, &legacy, ["logs", "meta"]).unwrap();
        let (logs, meta) = (db.cf_handle("logs").unwrap(), db.cf_handle("meta").unwrap());
        for i in 4..=9 {
            let bytes = crate::codec::encode(&entry(2, i)).unwrap();
            db.put_cf(logs, i.to_be_bytes(), bytes).unwrap();
        }
        db.put_cf(meta, "vote", enc(&Vote::new(2, 3))).unwrap();
        db.put_cf(meta, "committed", enc(&Some(entry(2, 8).log_id())))
            .unwrap();
        db.put_cf(meta, "last_purged", enc(&entry(2, 3).log_id()))
            .unwrap();
    }
    assert_eq!(migrate::from_rocksdb(data.path()).unwrap(), Some(6));
    assert!(
        !legacy.exists(),
        "the old log is removed once the new one is whole"
    );
    assert_eq!(migrate::from_rocksdb(data.path()).unwrap(), None);

    let mut log = open(&data.path().join(migrate::DIR));
    assert_eq!(
        all(&mut log).await,
        (4..=9).map(|i| (2, i)).collect::<Vec<_>>()
    );
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 3)));
    assert_eq!(
        log.read_committed().await.unwrap(),
        Some(entry(2, 8).log_id())
    );
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(entry(2, 3).log_id()));
    assert_eq!(state.last_log_id, Some(entry(2, 9).log_id()));
}

fn enc<T: serde::Serialize>(value: &T) -> Vec<u8> {
    crate::codec::encode(value).unwrap()
}

/// Random appends, truncations, purges, votes and restarts against a model of the log, with
/// segments small enough that a few steps fill one and purges delete them. Every entry is led by
/// replica 1: half the cases are replica 1's log (every group through the fsync thread), half
/// replica 2's (appends written in place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_read_back_as_the_model_says() {
    let seed = std::env::var("WAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    for case in 0..4 {
        history(seed.wrapping_add(case)).await;
    }
}

async fn history(seed: u64) {
    // Four seeds in a row: both kinds of replica, each writing directly and through the page
    // cache.
    let replica = 1 + seed % 2;
    let io = if (seed / 2) % 2 == 0 {
        Io::Direct
    } else {
        Io::PageCache
    };
    let open = |dir: &Path| {
        WalLogStore::open_io(dir, StorageHealth::default(), SMALL, io)
            .expect("open the log")
            .of_replica(replica)
    };
    use rand::Rng;
    use rand::SeedableRng;
    eprintln!(
        "reproduce: WAL_SEED={seed} cargo test -p gangway-consensus --lib random_histories \
         (replica {replica}'s log, {io:?})"
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    let mut model: BTreeMap<u64, LogId> = BTreeMap::new();
    let (mut purged, mut vote, mut term) = (None::<LogId>, None::<Vote>, 1);
    for step in 0..150 {
        let next = model
            .keys()
            .next_back()
            .or(purged.as_ref().map(|p| &p.index))
            .map_or(1, |i| i + 1);
        // A random index the log holds, if it holds any.
        let held = |rng: &mut rand_chacha::ChaCha8Rng| {
            let first = *model.keys().next()?;
            Some(rng.random_range(first..next))
        };
        match rng.random_range(0..10u32) {
            0..=4 => {
                let n = rng.random_range(1..=8);
                append(&mut log, term, next..=next + n - 1).await;
                model.extend((next..next + n).map(|i| (i, entry(term, i).log_id())));
            }
            5 => {
                // A new leader keeps a prefix (possibly empty) of what is not purged.
                let keep = held(&mut rng).map(|i| i - 1).unwrap_or(0);
                let last = model.get(&keep).copied().or(purged);
                log.truncate_after(last).await.unwrap();
                model.split_off(&(keep + 1));
                term += 1;
            }
            6 => {
                if let Some(i) = held(&mut rng) {
                    let id = model[&i];
                    log.purge(id).await.unwrap();
                    model = model.split_off(&(i + 1));
                    purged = Some(id);
                }
            }
            7 => {
                term += 1;
                let v = Vote::new(term, rng.random_range(1..4));
                log.save_vote(&v).await.unwrap();
                vote = Some(v);
            }
            8 => {
                drop(log);
                log = open(dir.path());
            }
            _ => {
                let c = model.values().next_back().copied();
                log.save_committed(c).await.unwrap();
            }
        }
        let want: Vec<(u64, u64)> = model
            .values()
            .map(|id| (id.leader_id.term, id.index))
            .collect();
        assert_eq!(all(&mut log).await, want, "seed {seed} step {step}");
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, purged, "seed {seed} step {step}");
        let last = model.values().next_back().copied().or(purged);
        assert_eq!(state.last_log_id, last, "seed {seed} step {step}");
        assert_eq!(
            log.read_vote().await.unwrap(),
            vote,
            "seed {seed} step {step}"
        );
    }
}

//! The etcd store against real etcd processes (`/usr/bin/etcd`, Debian package etcd-server): one
//! single-member cluster per test, and a three-member cluster for failover. Skipped (with a message) when
//! etcd is not installed.

use smesh_control::store::etcd::EtcdStore;
use smesh_control::store::{delete, put, Compare, Event, Op, Store, StoreError, TxnOutcome, WatchReceiver};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ETCD: &str = "/usr/bin/etcd";

fn etcd_available() -> bool {
    if Path::new(ETCD).exists() {
        return true;
    }
    eprintln!(
        "SKIPPED: {ETCD} not found; install it with `apt-get install -y etcd-server` to run the etcd store tests"
    );
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// etcd processes in a temporary directory, killed (SIGKILL, by pid) when dropped, even if the test fails.
struct EtcdCluster {
    members: Vec<Option<Child>>,
    client_urls: Vec<String>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    fn start(size: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            client_urls: ports
                .iter()
                .map(|(client, _)| format!("http://127.0.0.1:{client}"))
                .collect(),
            dir,
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(cluster.dir.path().join(format!("m{i}.log"))).unwrap();
            let child = Command::new(ETCD)
                .args(["--name", &format!("m{i}")])
                .args([
                    "--data-dir",
                    &cluster.dir.path().join(format!("m{i}")).to_string_lossy(),
                ])
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "smesh-test"])
                // Fast elections keep the failover test short (and the minimum lease TTL under a second).
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            cluster.members.push(Some(child));
        }
        cluster
    }

    /// Connects a store once every member answers (so calls go to the first endpoint until it fails).
    async fn store(&self, prefix: &str) -> Arc<EtcdStore> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for url in &self.client_urls {
            loop {
                match EtcdStore::connect(std::slice::from_ref(url), prefix).await {
                    // A write succeeding means the cluster has a leader.
                    Ok(store) if store.txn(vec![], vec![]).await.is_ok() => break,
                    Ok(_) => {}
                    Err(e) if Instant::now() > deadline => panic!("etcd did not come up: {e}\n{}", self.logs()),
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        EtcdStore::connect(&self.client_urls, prefix).await.unwrap()
    }

    fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].take() {
            // Child::kill is SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                let text = std::fs::read_to_string(self.dir.path().join(format!("m{i}.log"))).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                format!(
                    "--- m{i} log tail ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

fn put_op(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        lease: 0,
    }
}

/// Receives the next batch, failing the test instead of hanging.
async fn next_batch(rx: &mut WatchReceiver) -> Result<Vec<Event>, StoreError> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("watch timed out")
        .expect("watch closed")
}

#[tokio::test]
async fn put_get_list_delete_and_revisions() {
    if !etcd_available() {
        return;
    }
    let etcd = EtcdCluster::start(1);
    let store = etcd.store("/smesh").await;
    let r0 = store.revision().await.unwrap();
    assert_eq!(put(&*store, "/a/1", b"one".to_vec(), 0).await.unwrap(), r0 + 1);
    assert_eq!(put(&*store, "/a/2", b"two".to_vec(), 0).await.unwrap(), r0 + 2);
    assert_eq!(put(&*store, "/b/1", b"other".to_vec(), 0).await.unwrap(), r0 + 3);
    assert_eq!(put(&*store, "/a/1", b"uno".to_vec(), 0).await.unwrap(), r0 + 4);

    let kv = store.get("/a/1").await.unwrap().unwrap();
    assert_eq!(kv.key, "/a/1");
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.lease),
        (&b"uno"[..], r0 + 1, r0 + 4, 0)
    );
    assert_eq!(store.get("/missing").await.unwrap(), None);

    let (kvs, rev) = store.list("/a/").await.unwrap();
    assert_eq!(rev, r0 + 4);
    assert_eq!(
        kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        ["/a/1", "/a/2"]
    );
    assert_eq!(store.list("").await.unwrap().0.len(), 3);

    assert_eq!(delete(&*store, "/a/1").await.unwrap(), r0 + 5);
    assert_eq!(store.get("/a/1").await.unwrap(), None);
    put(&*store, "/a/1", b"again".to_vec(), 0).await.unwrap();
    let kv = store.get("/a/1").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (r0 + 6, r0 + 6));

    // Several ops share one revision; the same key twice keeps the last value.
    let out = store
        .txn(
            vec![],
            vec![put_op("/c/1", "x"), put_op("/c/2", "y"), put_op("/c/1", "z")],
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        TxnOutcome {
            succeeded: true,
            revision: r0 + 7
        }
    );
    assert_eq!(store.get("/c/1").await.unwrap().unwrap().value, b"z");
    assert_eq!(store.get("/c/2").await.unwrap().unwrap().mod_revision, r0 + 7);

    // Deleting nothing does not advance the revision.
    assert_eq!(delete(&*store, "/absent").await.unwrap(), r0 + 7);
    assert_eq!(store.txn(vec![], vec![]).await.unwrap().revision, r0 + 7);
    assert_eq!(store.revision().await.unwrap(), r0 + 7);

    // Another prefix on the same cluster sees nothing of this one, and the other way round.
    let other = EtcdStore::connect(&etcd.client_urls, "/other").await.unwrap();
    assert_eq!(other.list("").await.unwrap(), (vec![], r0 + 7));
    put(&*other, "/a/1", b"theirs".to_vec(), 0).await.unwrap();
    assert_eq!(store.get("/a/1").await.unwrap().unwrap().value, b"again");
    assert_eq!(store.list("").await.unwrap().0.len(), 5);

    // Lists larger than one etcd page are still one snapshot.
    let ops: Vec<Op> = (0..1500).map(|i| put_op(&format!("/many/{i:05}"), "v")).collect();
    for chunk in ops.chunks(100) {
        store.txn(vec![], chunk.to_vec()).await.unwrap();
    }
    let (kvs, rev) = store.list("/many/").await.unwrap();
    assert_eq!(kvs.len(), 1500);
    assert!(kvs.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(rev, store.revision().await.unwrap());
}

#[tokio::test]
async fn compare_and_swap_and_delete_prefix() {
    if !etcd_available() {
        return;
    }
    let etcd = EtcdCluster::start(1);
    let store = etcd.store("/smesh").await;
    let r0 = store.revision().await.unwrap();
    let cas = |rev: u64, v: &str| {
        (
            vec![Compare::ModRevision {
                key: "/k".into(),
                equals: rev,
            }],
            vec![put_op("/k", v)],
        )
    };
    // equals 0: create only if absent.
    let (c, o) = cas(0, "first");
    assert_eq!(
        store.txn(c, o).await.unwrap(),
        TxnOutcome {
            succeeded: true,
            revision: r0 + 1
        }
    );
    let (c, o) = cas(0, "second");
    assert_eq!(
        store.txn(c, o).await.unwrap(),
        TxnOutcome {
            succeeded: false,
            revision: r0 + 1
        }
    );
    let (c, o) = cas(r0 + 1, "updated");
    assert!(store.txn(c, o).await.unwrap().succeeded);
    let (c, o) = cas(r0 + 1, "stale");
    assert!(!store.txn(c, o).await.unwrap().succeeded);
    let kv = store.get("/k").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"updated"[..], r0 + 1, r0 + 2)
    );

    // A failed compare writes none of the ops.
    let compares = vec![
        Compare::ModRevision {
            key: "/k".into(),
            equals: r0 + 2,
        },
        Compare::ModRevision {
            key: "/other".into(),
            equals: 5,
        },
    ];
    let out = store
        .txn(compares, vec![put_op("/k", "no"), put_op("/new", "no")])
        .await
        .unwrap();
    assert!(!out.succeeded);
    assert_eq!(store.get("/new").await.unwrap(), None);
    assert_eq!(store.revision().await.unwrap(), r0 + 2);

    // DeletePrefix: everything under the prefix, under one revision, nothing beside it.
    for key in ["/p/a", "/p/b", "/p/c/d", "/pq", "/q"] {
        put(&*store, key, key.as_bytes().to_vec(), 0).await.unwrap();
    }
    let before = store.revision().await.unwrap();
    let mut rx = store.watch("/", before).await.unwrap();
    let out = store
        .txn(vec![], vec![Op::DeletePrefix { prefix: "/p/".into() }])
        .await
        .unwrap();
    assert_eq!(out.revision, before + 1);
    let keys: Vec<_> = store.list("").await.unwrap().0.into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, ["/k", "/pq", "/q"]);
    let batch = next_batch(&mut rx).await.unwrap();
    let deleted: Vec<_> = batch.iter().map(|e| (e.key().to_string(), e.revision())).collect();
    assert_eq!(
        deleted,
        [
            ("/p/a".into(), before + 1),
            ("/p/b".into(), before + 1),
            ("/p/c/d".into(), before + 1)
        ]
    );
    let Event::Delete { prev, .. } = &batch[0] else {
        panic!("expected a delete: {batch:?}")
    };
    assert_eq!(prev.value, b"/p/a");
    // Nothing left to delete: no new revision.
    let out = store
        .txn(vec![], vec![Op::DeletePrefix { prefix: "/p/".into() }])
        .await
        .unwrap();
    assert_eq!(out.revision, before + 1);
}

#[tokio::test]
async fn watch_orders_events_and_replays_from_a_revision() {
    if !etcd_available() {
        return;
    }
    let etcd = EtcdCluster::start(1);
    let store = etcd.store("/smesh").await;
    let r0 = store.revision().await.unwrap();
    put(&*store, "/x/1", b"a".to_vec(), 0).await.unwrap();
    put(&*store, "/y/1", b"b".to_vec(), 0).await.unwrap();
    put(&*store, "/x/2", b"c".to_vec(), 0).await.unwrap();
    delete(&*store, "/x/1").await.unwrap();

    // Replay from before the first write, then live.
    let mut rx = store.watch("/x/", r0).await.unwrap();
    assert!(
        matches!(&next_batch(&mut rx).await.unwrap()[..], [Event::Put(kv)] if kv.key == "/x/1" && kv.mod_revision == r0 + 1)
    );
    assert!(
        matches!(&next_batch(&mut rx).await.unwrap()[..], [Event::Put(kv)] if kv.key == "/x/2" && kv.mod_revision == r0 + 3)
    );
    let batch = next_batch(&mut rx).await.unwrap();
    assert!(
        matches!(&batch[..], [Event::Delete { key, revision, prev }] if key == "/x/1" && *revision == r0 + 4 && prev.value == b"a"),
        "{batch:?}"
    );
    put(&*store, "/y/2", vec![], 0).await.unwrap();
    put(&*store, "/x/3", vec![], 0).await.unwrap();
    assert_eq!(next_batch(&mut rx).await.unwrap()[0].revision(), r0 + 6);

    // From the middle, and from the future.
    let mut middle = store.watch("/x/", r0 + 3).await.unwrap();
    assert_eq!(next_batch(&mut middle).await.unwrap()[0].revision(), r0 + 4);
    let mut future = store.watch("", r0 + 7).await.unwrap();
    put(&*store, "/z", vec![], 0).await.unwrap();
    put(&*store, "/z", vec![], 0).await.unwrap();
    assert_eq!(next_batch(&mut future).await.unwrap()[0].revision(), r0 + 8);

    // Concurrent writers: every revision exactly once, in order, one batch per transaction.
    let start = store.revision().await.unwrap();
    let mut all = store.watch("/w/", start).await.unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let ops = vec![
                        put_op(&format!("/w/{w}/{i}/a"), "1"),
                        put_op(&format!("/w/{w}/{i}/b"), "2"),
                    ];
                    store.txn(vec![], ops).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for expected in start + 1..=start + 100 {
        let batch = next_batch(&mut all).await.unwrap();
        assert_eq!(batch.len(), 2);
        assert!(batch.iter().all(|e| e.revision() == expected));
    }
    assert!(all.try_recv().is_err());

    // History before a compaction is gone.
    let now = store.revision().await.unwrap();
    store.compact(now).await.unwrap();
    let mut old = store.watch("/x/", r0).await.unwrap();
    assert_eq!(next_batch(&mut old).await, Err(StoreError::Compacted { oldest: now }));
    assert!(old.recv().await.is_none());
    // Watching from the compaction point on works.
    let mut fresh = store.watch("/x/", now).await.unwrap();
    put(&*store, "/x/4", vec![], 0).await.unwrap();
    assert_eq!(next_batch(&mut fresh).await.unwrap()[0].key(), "/x/4");
}

#[tokio::test]
async fn leases_expire_keep_alive_and_revoke() {
    if !etcd_available() {
        return;
    }
    let etcd = EtcdCluster::start(1);
    let store = etcd.store("/smesh").await;

    // Unknown leases are refused and write nothing.
    let r0 = store.revision().await.unwrap();
    assert_eq!(put(&*store, "/r", vec![], 42).await, Err(StoreError::LeaseNotFound(42)));
    assert_eq!(store.keep_alive(42).await, Err(StoreError::LeaseNotFound(42)));
    assert_eq!(store.revoke_lease(42).await, Err(StoreError::LeaseNotFound(42)));
    assert_eq!(store.revision().await.unwrap(), r0);

    // Expiry deletes the lease's keys under one revision, with delete events.
    let short = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    assert_ne!(short, 0);
    // Kept alive for a while: outlives its TTL.
    let kept = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    put(&*store, "/l/a", b"a".to_vec(), short).await.unwrap();
    put(&*store, "/l/b", b"b".to_vec(), short).await.unwrap();
    put(&*store, "/l/c", b"c".to_vec(), 0).await.unwrap();
    put(&*store, "/l/kept", vec![], kept).await.unwrap();
    assert_eq!(store.get("/l/a").await.unwrap().unwrap().lease, short);
    let after = store.revision().await.unwrap();
    let mut rx = store.watch("/l/", after).await.unwrap();

    let started = Instant::now();
    let keep = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..8 {
                store.keep_alive(kept).await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let batch = next_batch(&mut rx).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "expired late: {:?}",
        started.elapsed()
    );
    assert!(batch
        .iter()
        .all(|e| matches!(e, Event::Delete { .. }) && e.revision() == after + 1));
    assert_eq!(batch.iter().map(Event::key).collect::<Vec<_>>(), ["/l/a", "/l/b"]);
    assert_eq!(store.keep_alive(short).await, Err(StoreError::LeaseNotFound(short)));
    assert_eq!(
        put(&*store, "/l/d", vec![], short).await,
        Err(StoreError::LeaseNotFound(short))
    );
    keep.await.unwrap();
    // About 2.4 s after the grant of a 1 s lease, kept alive all along.
    assert!(store.get("/l/kept").await.unwrap().is_some());

    // Revoke deletes the keys now; a second revoke finds nothing.
    let rev = store.revision().await.unwrap();
    store.revoke_lease(kept).await.unwrap();
    let batch = next_batch(&mut rx).await.unwrap();
    assert!(matches!(&batch[..], [Event::Delete { key, revision, .. }] if key == "/l/kept" && *revision == rev + 1));
    assert_eq!(store.revoke_lease(kept).await, Err(StoreError::LeaseNotFound(kept)));
    assert_eq!(store.keep_alive(kept).await, Err(StoreError::LeaseNotFound(kept)));
    let (kvs, _) = store.list("/l/").await.unwrap();
    assert_eq!(kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["/l/c"]);
}

#[tokio::test]
async fn survives_the_loss_of_a_member() {
    if !etcd_available() {
        return;
    }
    let mut etcd = EtcdCluster::start(3);
    let store = etcd.store("/smesh").await;
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    put(&*store, "/ha/leased", vec![], lease).await.unwrap();
    let start = store.revision().await.unwrap();
    let mut rx = store.watch("/ha/", start).await.unwrap();

    let mut written = Vec::new();
    for i in 0..10 {
        written.push(put(&*store, &format!("/ha/{i:02}"), vec![i], 0).await.unwrap());
    }
    // Calls go to the first endpoint until it fails: that is the member to lose.
    etcd.kill(0);
    let killed = Instant::now();
    for i in 10..30 {
        let rev = put(&*store, &format!("/ha/{i:02}"), vec![i], 0)
            .await
            .unwrap_or_else(|e| panic!("write {i} after the kill failed: {e}\n{}", etcd.logs()));
        written.push(rev);
    }
    eprintln!("20 writes after the kill took {:?}", killed.elapsed());
    // A conditional write (retried only if it was provably not sent) works too.
    let create = store
        .txn(
            vec![Compare::ModRevision {
                key: "/ha/cas".into(),
                equals: 0,
            }],
            vec![put_op("/ha/cas", "x")],
        )
        .await
        .unwrap();
    assert!(create.succeeded);
    written.push(create.revision);

    // The open watch saw every write exactly once, in order, across the failover.
    for (i, rev) in written.iter().enumerate() {
        let batch = next_batch(&mut rx).await.unwrap();
        assert_eq!(batch.len(), 1, "{batch:?}");
        assert_eq!(batch[0].revision(), *rev, "event {i}");
    }
    assert!(rx.try_recv().is_err(), "no duplicates");

    // Reads and leases work on the remaining members.
    let (kvs, _) = store.list("/ha/").await.unwrap();
    assert_eq!(kvs.len(), 32);
    store.keep_alive(lease).await.unwrap();
    let other = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store.revoke_lease(other).await.unwrap();
    store.revoke_lease(lease).await.unwrap();
    let batch = next_batch(&mut rx).await.unwrap();
    assert!(matches!(&batch[..], [Event::Delete { key, .. }] if key == "/ha/leased"));

    // A new store given the dead member first still connects.
    let again = EtcdStore::connect(&etcd.client_urls, "/smesh").await.unwrap();
    assert_eq!(again.get("/ha/cas").await.unwrap().unwrap().value, b"x");
}

#[tokio::test]
async fn unreachable_cluster_is_a_clear_error() {
    // No etcd needed: the port is bound but not listening, so connections are refused, and
    // it stays taken while the test runs (a port merely found free could be handed to an
    // etcd that a test running alongside starts).
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = reserved.local_addr().unwrap().port();
    let urls = vec![format!("http://127.0.0.1:{port}")];
    let started = Instant::now();
    let err = match tokio::time::timeout(Duration::from_secs(30), EtcdStore::connect(&urls, "/smesh")).await {
        Ok(Err(err)) => err,
        Ok(Ok(_)) => panic!("connected to nothing"),
        Err(_) => panic!("connect did not give up"),
    };
    let StoreError::Backend(message) = err else {
        panic!("unexpected error {err:?}")
    };
    assert!(message.contains(&urls[0]), "{message}");
    eprintln!("after {:?}: {message}", started.elapsed());
}

//! `--source file:PATH` when reading a new version fails for a reason that passes (out of file
//! descriptors): the version must not count as seen, so it is read once the reason goes. Its own
//! test binary: it lowers the process's descriptor limit, which would break tests beside it.

mod support;

use std::{io::Write as _, time::Duration};

use kube_ovn_agent::source::file::{self, FileOptions};
use support::{TempDir, errors, wait_until};

const EXAMPLE: &str = include_str!("../../deploy/examples/cluster.yaml");

const WEB: &str = "---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: ClusterIP
  clusterIPs: [10.96.0.50]
  ports: [{name: http, protocol: TCP, port: 8080, targetPort: 80}]
";

fn nofile() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) },
        0
    );
    limit
}

fn set_nofile(limit: libc::rlimit) {
    // SAFETY: setrlimit reads one rlimit through a valid pointer.
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) },
        0
    );
}

/// The lowest free descriptor number: a soft limit at it makes every new open fail (EMFILE).
fn lowest_free_fd() -> u64 {
    let probe = std::fs::File::open("/dev/null").unwrap();
    u64::try_from(std::os::fd::AsRawFd::as_raw_fd(&probe)).expect("a descriptor is not negative")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_could_not_be_read_is_read_again() {
    let dir = TempDir::new("file-emfile");
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let running = file::start(FileOptions {
        poll_interval: Duration::from_millis(50),
        ..FileOptions::new(&path)
    })
    .expect("starting the file source");
    let has_web = || {
        running
            .source
            .snapshot()
            .services
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some("web"))
    };
    assert!(!has_web());

    // The next version's file is opened now: writing and renaming it later needs no descriptor.
    let tmp = path.with_extension("tmp");
    let mut next = std::fs::File::create(&tmp).unwrap();
    let normal = nofile();
    let before = errors(&running.source.status());
    set_nofile(libc::rlimit {
        rlim_cur: lowest_free_fd(),
        ..normal
    });
    let outcome = async {
        next.write_all(format!("{EXAMPLE}{WEB}").as_bytes())?;
        next.flush()?;
        std::fs::rename(&tmp, &path)?;
        std::io::Result::Ok(())
    }
    .await;
    if let Err(e) = outcome {
        set_nofile(normal);
        panic!("writing the next version: {e}");
    }
    let failed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let status = running.source.status();
            if errors(&status) > before {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Restore before asserting: a failed assertion must not leave the limit down.
    set_nofile(normal);
    let status = failed.expect("the read failure was not reported within 20 s");
    let message = status
        .kinds
        .values()
        .find_map(|k| k.last_error.as_deref())
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("open") && message.contains("Too many open files"),
        "{message}"
    );
    assert!(
        !has_web(),
        "nothing applied from a version that was not read"
    );
    drop(next);

    // Descriptors are back: the same version (no new write) is read and applied.
    wait_until("the version read once descriptors are back", has_web).await;
}

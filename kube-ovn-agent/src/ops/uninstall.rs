//! `kube-ovn-agent uninstall-wait`: the chart's uninstall hook waits with it until the uninstall
//! `DaemonSet` has run `detach` on every node. That `DaemonSet`'s pods run `detach` in an init
//! container and only then become ready, so "every scheduled pod ready and up to date" means
//! "every node detached". Helm waits for the hook Job, so `helm uninstall` blocks until then (or
//! its timeout). It reads one object with `get` and nothing else, so its Role can name it.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;

use super::preflight::DaemonSetRef;

#[derive(Debug, thiserror::Error)]
pub enum UninstallWaitError {
    #[error("no Kubernetes API: {0}")]
    Client(#[source] kube::Error),
    #[error("DaemonSet {target} not detached on every node within {timeout:?}: {progress}")]
    Timeout {
        target: String,
        timeout: Duration,
        progress: String,
    },
}

/// `Ok` with a summary once every node the `DaemonSet` is scheduled to has an up-to-date ready
/// pod; `Err` with the progress so far otherwise.
pub fn detached_everywhere(ds: &DaemonSet) -> Result<String, String> {
    let generation = ds.metadata.generation.unwrap_or(0);
    let Some(status) = &ds.status else {
        return Err("no status yet".into());
    };
    // Before the controller has seen this generation its counts describe an older one (or none:
    // a fresh object's zeros would read as "nothing to do").
    if status.observed_generation.unwrap_or(0) < generation || generation == 0 {
        return Err(format!(
            "the DaemonSet controller has not seen generation {generation} yet"
        ));
    }
    let desired = status.desired_number_scheduled;
    let updated = status.updated_number_scheduled.unwrap_or(0);
    let ready = status.number_ready;
    if updated == desired && ready == desired {
        Ok(format!("detached on all {desired} nodes"))
    } else {
        Err(format!(
            "{ready} of {desired} nodes detached ({updated} pods up to date); a node whose pod \
             stays unready has its detach init container failing or waiting for the agent to \
             exit: see its logs"
        ))
    }
}

/// Polls `target` every `poll` until [`detached_everywhere`] or `timeout`. A failed read (the
/// object not created yet, an API hiccup) counts as progress unknown, not as an error: only the
/// timeout ends the wait unsuccessfully.
pub async fn wait(
    target: &DaemonSetRef,
    timeout: Duration,
    poll: Duration,
) -> Result<String, UninstallWaitError> {
    let client = kube::Client::try_default()
        .await
        .map_err(UninstallWaitError::Client)?;
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, &target.namespace);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let read = tokio::time::timeout(poll.max(Duration::from_secs(1)), api.get(&target.name));
        let progress = match read.await {
            Ok(Ok(ds)) => match detached_everywhere(&ds) {
                Ok(done) => return Ok(done),
                Err(now) => now,
            },
            Ok(Err(error)) => format!("cannot read it: {error}"),
            Err(_) => "the API server did not answer".into(),
        };
        if tokio::time::Instant::now() + poll > deadline {
            return Err(UninstallWaitError::Timeout {
                target: target.to_string(),
                timeout,
                progress,
            });
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(generation: i64, status: Option<serde_json::Value>) -> DaemonSet {
        let mut object = serde_json::json!({
            "metadata": {"name": "kube-ovn-ebpf-uninstall", "generation": generation},
            "spec": {"selector": {}, "template": {}}
        });
        if let Some(status) = status {
            object["status"] = status;
        }
        serde_json::from_value(object).unwrap()
    }

    fn status(observed: i64, desired: i32, updated: i32, ready: i32) -> serde_json::Value {
        serde_json::json!({
            "observedGeneration": observed, "desiredNumberScheduled": desired,
            "updatedNumberScheduled": updated, "numberReady": ready,
            "currentNumberScheduled": desired, "numberMisscheduled": 0
        })
    }

    #[test]
    fn done_only_when_every_scheduled_pod_is_ready_and_current() {
        assert!(detached_everywhere(&ds(1, None)).is_err());
        let fresh = detached_everywhere(&ds(1, Some(status(0, 0, 0, 0)))).unwrap_err();
        assert!(fresh.contains("not seen"), "{fresh}");
        let partial = detached_everywhere(&ds(1, Some(status(1, 3, 3, 2)))).unwrap_err();
        assert!(partial.starts_with("2 of 3 nodes detached"), "{partial}");
        assert!(detached_everywhere(&ds(1, Some(status(1, 3, 2, 3)))).is_err());
        assert_eq!(
            detached_everywhere(&ds(1, Some(status(1, 3, 3, 3)))),
            Ok("detached on all 3 nodes".into())
        );
        // A cluster without a matching node has nothing to detach.
        assert!(detached_everywhere(&ds(2, Some(status(2, 0, 0, 0)))).is_ok());
    }
}

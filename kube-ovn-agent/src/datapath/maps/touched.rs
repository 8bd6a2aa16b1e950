//! Writing only what an incremental translation step touched ([`Touched`]).

use super::{FamilyTables, SyncReport, Tables};
use crate::state::{FamilyState, FamilyTouched, MapState, Touched};

impl Tables {
    /// Brings the `touched` keys of every map to `desired` and the config to `desired`'s,
    /// leaving every other entry alone: O(touched). `desired` must have the rules and
    /// interfaces the maps were last fully synced with ([`Tables::apply`] otherwise). The
    /// order is [`Tables::apply`]'s: fill, config, prune, with a NodePort port keeping its old
    /// bits until the prune.
    pub fn apply_touched(&mut self, desired: &MapState, touched: &Touched) -> SyncReport {
        let mut report = SyncReport::default();
        sync_family(&mut self.v4, &desired.v4, &touched.v4, false, &mut report);
        if !touched.v4.subnets.is_empty() {
            self.sync_dirs(&mut report);
        }
        sync_family(&mut self.v6, &desired.v6, &touched.v6, false, &mut report);
        self.sync_fronts_touched(desired, touched, false, &mut report);
        let entries = self.nodeport_local.entries();
        let filled: Vec<(u16, u8)> = touched
            .nodeport_local
            .iter()
            .map(|port| {
                let old = entries.get(port).copied().unwrap_or(0);
                (*port, desired.nodeport_bits(*port) | old)
            })
            .collect();
        report.add(self.nodeport_local.sync_keys(
            filled.iter().map(|(port, _)| port),
            |port| {
                filled
                    .binary_search_by_key(port, |(p, _)| *p)
                    .ok()
                    .map(|i| filled[i].1)
                    .filter(|bits| *bits != 0)
            },
            false,
        ));
        // The pruning pass below retries every write that failed (a map too full before its
        // stale entries go) and reports what still fails.
        report.errors.clear();
        report.add(self.config.sync([((), desired.config())], true));
        // The fronts drop what the tries and hashes are about to lose first (a key the program
        // finds in a front is taken as a member), and take what the retries wrote after.
        self.sync_fronts_touched(desired, touched, true, &mut report);
        sync_family(&mut self.v4, &desired.v4, &touched.v4, true, &mut report);
        if !touched.v4.subnets.is_empty() {
            self.sync_dirs(&mut report);
        }
        sync_family(&mut self.v6, &desired.v6, &touched.v6, true, &mut report);
        self.sync_fronts_touched(desired, touched, false, &mut report);
        report.add(self.nodeport_local.sync_keys(
            &touched.nodeport_local,
            |port| Some(desired.nodeport_bits(*port)).filter(|bits| *bits != 0),
            true,
        ));
        report
    }

    fn sync_fronts_touched(
        &mut self,
        desired: &MapState,
        touched: &Touched,
        prune: bool,
        report: &mut SyncReport,
    ) {
        report.errors.extend(
            self.fronts
                .sync_touched(&self.v4, &self.v6, desired, touched, prune),
        );
    }
}

fn sync_family<N: Ord + Copy, A: Ord + Copy>(
    tables: &mut FamilyTables<N, A>,
    desired: &FamilyState<N, A>,
    touched: &FamilyTouched<N, A>,
    prune: bool,
    report: &mut SyncReport,
) {
    fn member<T: Ord>(set: &std::collections::BTreeSet<T>) -> impl Fn(&T) -> Option<()> + '_ {
        |key| set.contains(key).then_some(())
    }
    let (t, d, k) = (tables, desired, touched);
    report.add(t.subnets.sync_keys(&k.subnets, member(&d.subnets), prune));
    report.add(
        t.service_cidrs
            .sync_keys(&k.service_cidrs, member(&d.service_cidrs), prune),
    );
    report.add(
        t.service_ports
            .sync_keys(&k.service_ports, member(&d.service_ports), prune),
    );
    report.add(
        t.other_nodes
            .sync_keys(&k.other_nodes, member(&d.other_nodes), prune),
    );
    report.add(t.local.sync_keys(&k.local, member(&d.local), prune));
    report.add(
        t.probe_targets
            .sync_keys(&k.probe_targets, member(&d.probe_targets), prune),
    );
}

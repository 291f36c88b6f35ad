//! The source's side of a migration: starting groups, the three steps as the source sees
//! them (ready, switched, drained, done), giving up and rolling back, the tombstones that
//! forward late stragglers, and the timers.

use super::*;

impl Migrator {
    pub(super) fn start_groups(&mut self, host: &mut impl FlowHost, now_ms: u64) {
        let in_flight = self.out.len();
        let mut room = self.settings.max_groups.saturating_sub(in_flight);
        while room > 0 {
            let Some(j) = self.job.as_mut() else { return };
            if j.report.done || j.remaining == 0 || now_ms < j.retry_after_ms {
                return;
            }
            let target = j.report.target.unwrap_or(self.me);
            let want = self.settings.group_size.min(j.remaining as usize);
            let rate = self.settings.max_flows_per_s;
            if rate > 0 {
                // Token bucket: a group starts once its flows' worth of time has passed.
                // It holds one group, or two milliseconds' worth if more: the clock ticks
                // in milliseconds, and a bucket of one group would start at most one group
                // a tick (256,000 flows/s by default) whatever the limit said.
                let depth = (self.settings.group_size as f64).max(rate as f64 * 0.002);
                let elapsed = now_ms.saturating_sub(j.tokens_at_ms) as f64 / 1000.0;
                j.tokens = (j.tokens + rate as f64 * elapsed).min(depth);
                j.tokens_at_ms = now_ms;
                if j.tokens < want as f64 {
                    return;
                }
            }
            let mut picked = std::mem::take(&mut self.picked);
            picked.clear();
            if !j.retry.is_empty() {
                let v = j.retry[0].vswitch;
                let mut i = 0;
                while i < j.retry.len() && picked.len() < want {
                    if j.retry[i].vswitch == v {
                        picked.push(j.retry.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            } else if !j.scan_done && !host.pick(want, &mut picked) {
                j.scan_done = true;
            }
            // A group has one vswitch: flows fed by others wait for a later group.
            if let Some(v) = picked.first().map(|c| c.vswitch) {
                let mut i = 0;
                while i < picked.len() {
                    if picked[i].vswitch != v {
                        j.retry.push(picked.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            if picked.is_empty() {
                self.picked = picked;
                return;
            }
            let id = self.next_group;
            let vswitch = picked[0].vswitch;
            let mut flows = Vec::with_capacity(picked.len());
            let mut wire = Vec::with_capacity(picked.len());
            for c in picked.drain(..) {
                let at = FlowRef {
                    key: c.key,
                    row: c.row,
                };
                // A flow put back for a retry may have ended since, and its key may even be
                // arriving here from elsewhere now: only a flow still here and not diverted
                // joins the group.
                if !host.divert(&at, Some(id)) {
                    continue;
                }
                wire.push(MigrateFlow {
                    key: c.key,
                    aliases: c.aliases.clone(),
                });
                flows.push(OutFlow {
                    key: c.key,
                    row: c.row,
                    aliases: c.aliases,
                    sent: 0,
                    drained: false,
                });
            }
            self.picked = picked;
            if flows.is_empty() {
                continue;
            }
            // Group ids stay below `GROUP_ID_LIMIT`; one wraps after two billion groups,
            // long after any group of that number has ended.
            self.next_group = if id + 1 >= GROUP_ID_LIMIT { 1 } else { id + 1 };
            if let Some(j) = self.job.as_mut() {
                j.remaining = j.remaining.saturating_sub(flows.len() as u32);
                if rate > 0 {
                    j.tokens -= flows.len() as f64;
                }
                j.report.groups += 1;
            }
            // Step 2 follows within a millisecond or so.
            host.keep_awake(vswitch);
            host.send(
                target,
                Message::MigrateInit {
                    group: id,
                    chain: self.chain.clone(),
                    vswitch,
                    flows: wire,
                },
            );
            self.out.insert(
                id,
                OutGroup {
                    target,
                    vswitch,
                    stage: OutStage::Init,
                    target_died: false,
                    deadline_ms: now_ms + self.settings.step_timeout_ms,
                    flows,
                    accepted_digest: 0,
                },
            );
            room -= 1;
        }
    }

    pub(super) fn finish_job(&mut self, clock_ms: f64) {
        let idle = self.out.is_empty();
        let Some(j) = self.job.as_mut() else { return };
        if j.report.done || !idle {
            return;
        }
        let nothing_left = j.retry.is_empty() && (j.remaining == 0 || j.scan_done);
        if nothing_left || j.report.error.is_some() {
            j.report.done = true;
            j.report.elapsed_us = ((clock_ms - j.started_ms) * 1000.0).max(0.0) as u64;
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn source_ready(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        id: u64,
        accepted: Vec<bool>,
        refused: Option<String>,
        busy: bool,
        now_ms: u64,
    ) {
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        if g.stage != OutStage::Init || g.target != from {
            return;
        }
        if let Some(reason) = refused {
            let flows = std::mem::take(&mut g.flows);
            let vswitch = g.vswitch;
            self.out.remove(&id);
            for f in &flows {
                undivert(host, f, id);
            }
            if let Some(j) = self.job.as_mut() {
                if busy {
                    // The target's buffer is filling: the same flows, a little later.
                    j.remaining += flows.len() as u32;
                    j.report.groups = j.report.groups.saturating_sub(1);
                    j.retry.extend(flows.into_iter().map(|f| Candidate {
                        key: f.key,
                        row: f.row,
                        aliases: f.aliases,
                        vswitch,
                    }));
                    j.retry_after_ms = now_ms + 5;
                } else {
                    j.report.failed += flows.len() as u64;
                    j.report.error = Some(format!("target refused: {reason}"));
                }
            }
            return;
        }
        // Flows the target could not take stay here.
        let mut keep = Vec::with_capacity(g.flows.len());
        let mut failed = 0;
        for (i, f) in std::mem::take(&mut g.flows).into_iter().enumerate() {
            if accepted.get(i).copied().unwrap_or(false) {
                keep.push(f);
            } else {
                undivert(host, &f, id);
                failed += 1;
            }
        }
        if let Some(j) = self.job.as_mut() {
            j.report.failed += failed;
        }
        if keep.is_empty() {
            self.out.remove(&id);
            return;
        }
        let keys = all_keys(&keep);
        g.accepted_digest = keys_digest(keep.iter().map(|f| &f.key));
        g.flows = keep;
        g.stage = OutStage::Switching;
        g.deadline_ms = now_ms + self.settings.step_timeout_ms;
        let (vswitch, target) = (g.vswitch, g.target);
        host.send(
            vswitch,
            Message::SetRuntime {
                keys,
                from: self.me,
                runtime: target,
                request: id,
            },
        );
    }

    pub(super) fn source_switched(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        request: u64,
        sent: Vec<u32>,
        now_ms: u64,
    ) {
        let id = request & !ROLLBACK;
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        if g.vswitch != from {
            return;
        }
        if request & ROLLBACK != 0 {
            if let OutStage::RollingBack { need_target, .. } = g.stage {
                self.set_rollback(host, id, false, need_target);
            }
            return;
        }
        if g.stage != OutStage::Switching {
            return;
        }
        // `sent` follows the keys in the order they were asked for: each flow's key, then
        // its aliases.
        let mut it = sent.into_iter();
        let mut waiting = 0u64;
        for f in &mut g.flows {
            let n = 1 + f.aliases.len();
            f.sent = it.by_ref().take(n).fold(0u32, |a, b| a.wrapping_add(b));
            f.drained = match host.packets(&f.at()) {
                Some(p) if !later(p, f.sent) => {
                    waiting += f.sent.wrapping_sub(p) as u64;
                    false
                }
                _ => true,
            };
        }
        if let Some(j) = self.job.as_mut() {
            j.report.stragglers_waited += waiting;
        }
        g.stage = OutStage::Draining;
        g.deadline_ms = now_ms + self.settings.straggler_timeout_ms;
        self.check_drained(host, now_ms);
    }

    /// Hands over the groups whose stragglers have all been processed (or waited for long
    /// enough).
    pub(super) fn check_drained(&mut self, host: &mut impl FlowHost, now_ms: u64) {
        let mut ready = Vec::new();
        for (id, g) in self.out.iter_mut() {
            if g.stage != OutStage::Draining {
                continue;
            }
            let mut all = true;
            for f in g.flows.iter_mut().filter(|f| !f.drained) {
                f.drained = host.packets(&f.at()).is_none_or(|p| later(p, f.sent));
                all &= f.drained;
            }
            if all || now_ms >= g.deadline_ms {
                ready.push(*id);
            }
        }
        for id in ready {
            let Some(g) = self.out.get_mut(&id) else {
                continue;
            };
            let mut states = Vec::with_capacity(g.flows.len());
            let mut blob = Vec::with_capacity(g.flows.len() * STATE_BYTES_GUESS);
            let mut gone = Vec::new();
            // A flow is named by its place in the group as the target accepted it, which
            // is `g.flows` as `source_ready` left it (nothing leaves it before this).
            for (idx, f) in g.flows.iter().enumerate() {
                let missing = if f.drained {
                    0
                } else {
                    host.packets(&f.at())
                        .map(|p| {
                            if later(p, f.sent) {
                                0
                            } else {
                                f.sent.wrapping_sub(p)
                            }
                        })
                        .unwrap_or(0)
                };
                match host.save(&f.at(), &mut blob) {
                    Some(mut st) => {
                        st.idx = idx as u32;
                        st.missing = missing;
                        states.push(st);
                    }
                    // The flow ended while it drained (a close): nothing to move.
                    None => gone.push(f.key),
                }
            }
            if !gone.is_empty() {
                g.flows.retain(|f| !gone.contains(&f.key));
            }
            if states.is_empty() {
                self.out.remove(&id);
                continue;
            }
            g.stage = OutStage::Handover;
            let target = g.target;
            host.send(
                target,
                Message::MigrateState {
                    group: id,
                    accepted_digest: g.accepted_digest,
                    flows: states,
                    states: blob,
                },
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn source_done(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        id: u64,
        installed: Vec<bool>,
        buffered: u32,
        dropped: u32,
        now_ms: u64,
    ) {
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        if g.stage != OutStage::Handover || g.target != from {
            return;
        }
        let mut moved = 0u64;
        let mut not_installed = Vec::new();
        for i in 0..g.flows.len() {
            if installed.get(i).copied().unwrap_or(false) {
                moved += 1;
            } else {
                not_installed.push(i);
            }
        }
        // The target had no pending actor for these (it expired): the vswitch points at
        // it, so bring them back.
        let mut back = Vec::new();
        for i in not_installed.into_iter().rev() {
            back.push(g.flows.swap_remove(i));
        }
        let (vswitch, target) = (g.vswitch, g.target);
        self.counters.flows_out += moved;
        if let Some(j) = self.job.as_mut() {
            j.report.moved += moved;
            j.report.failed += back.len() as u64;
            j.report.buffered += buffered as u64;
            j.report.buffer_drops += dropped as u64;
        }
        if !back.is_empty() {
            let keys = all_keys(&back);
            host.send(
                vswitch,
                Message::SetRuntime {
                    keys,
                    from: target,
                    runtime: self.me,
                    request: 0,
                },
            );
            for f in back {
                undivert(host, &f, id);
            }
        }
        if let Some(g) = self.out.remove(&id) {
            let settled = g.flows.iter().all(|f| f.drained);
            self.tombs.insert(
                id,
                Tomb {
                    target: g.target,
                    flows: g.flows.iter().map(OutFlow::at).collect(),
                    settled,
                },
            );
            self.tomb_order
                .push_back((now_ms + self.settings.tombstone_ms, id));
        }
    }

    pub(super) fn source_aborted(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        id: u64,
        owned: Vec<FlowKey>,
    ) {
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        if g.target != from {
            return;
        }
        if let OutStage::RollingBack { need_vswitch, .. } = g.stage {
            if !owned.is_empty() {
                // Installed before the abort arrived: those are the target's now.
                let mut tomb = Vec::new();
                g.flows.retain(|f| {
                    if owned.contains(&f.key) {
                        tomb.push(f.at());
                        false
                    } else {
                        true
                    }
                });
                for f in tomb {
                    host.retire(&f);
                }
            }
            self.set_rollback(host, id, need_vswitch, false);
        }
    }

    /// Undoes a switch: the vswitch points back here, the target returns what it holds;
    /// packets arriving meanwhile are held, then everything resumes in order.
    pub(super) fn roll_back(
        &mut self,
        host: &mut impl FlowHost,
        id: u64,
        target_alive: bool,
        now_ms: u64,
    ) {
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        let keys = all_keys(&g.flows);
        g.deadline_ms = now_ms + self.settings.step_timeout_ms;
        let (vswitch, target) = (g.vswitch, g.target);
        host.send(
            vswitch,
            Message::SetRuntime {
                keys,
                from: target,
                runtime: self.me,
                request: id | ROLLBACK,
            },
        );
        if target_alive {
            host.send(target, Message::MigrateAbort { group: id });
        }
        if let Some(j) = self.job.as_mut() {
            j.report.groups_rolled_back += 1;
        }
        self.set_rollback(host, id, true, target_alive);
    }

    pub(super) fn set_rollback(
        &mut self,
        host: &mut impl FlowHost,
        id: u64,
        need_vswitch: bool,
        need_target: bool,
    ) {
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        if need_vswitch || need_target {
            g.stage = OutStage::RollingBack {
                need_vswitch,
                need_target,
            };
        } else {
            self.resume(host, id, true);
        }
    }

    /// The flows of the group stay here: held packets are processed, diversion ends.
    pub(super) fn resume(&mut self, host: &mut impl FlowHost, id: u64, rolled_back: bool) {
        let Some(g) = self.out.remove(&id) else {
            return;
        };
        if g.target_died {
            let flows: Vec<MigrateFlow> = g
                .flows
                .iter()
                .map(|f| MigrateFlow {
                    key: f.key,
                    aliases: f.aliases.clone(),
                })
                .collect();
            host.send(
                g.target,
                Message::MigrateForget {
                    group: id,
                    vswitch: g.vswitch,
                    flows: flows.clone(),
                },
            );
            self.forgets.push(Forget {
                target: g.target,
                until_ms: self.now_ms + self.settings.tombstone_ms,
                next_ms: self.now_ms,
                group: id,
                vswitch: g.vswitch,
                flows,
            });
        }
        for f in &g.flows {
            if undivert(host, f, id) {
                host.release_held(&f.at(), Release::Process);
            }
        }
        if rolled_back {
            self.counters.rolled_back += g.flows.len() as u64;
        }
        if let Some(j) = self.job.as_mut() {
            j.report.failed += g.flows.len() as u64;
        }
    }

    pub(super) fn retire_tomb(&mut self, host: &mut impl FlowHost, id: u64) {
        let Some(t) = self.tombs.remove(&id) else {
            return;
        };
        for f in &t.flows {
            // Not if the flow came back meanwhile (`reclaim`) and is someone else's now.
            if host.group_of(f) == Some(id) {
                host.retire(f);
            }
        }
    }

    /// A flow this runtime handed to `from` is coming back from it before its tombstone
    /// expired: if no straggler of it can still arrive here, drop the tombstone's actor so
    /// a pending one can take its place. Otherwise the flow is refused (it stays at `from`).
    pub(super) fn reclaim(&mut self, host: &mut impl FlowHost, from: EndpointAddr, key: &FlowKey) {
        let at = FlowRef::key_only(*key);
        let Some(id) = host.group_of(&at) else {
            return;
        };
        if self
            .tombs
            .get(&id)
            .is_some_and(|t| t.target == from && t.settled)
        {
            host.retire(&at);
        }
    }

    pub(super) fn expire(&mut self, host: &mut impl FlowHost, now_ms: u64) {
        while let Some(&(deadline, id)) = self.tomb_order.front() {
            if deadline > now_ms {
                break;
            }
            self.tomb_order.pop_front();
            self.retire_tomb(host, id);
        }
        let due: Vec<u64> = self
            .out
            .iter()
            .filter(|(_, g)| g.stage != OutStage::Draining && now_ms >= g.deadline_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(g) = self.out.get(&id) else { continue };
            match g.stage {
                OutStage::Init => {
                    let target = g.target;
                    host.send(target, Message::MigrateAbort { group: id });
                    self.resume(host, id, false);
                }
                OutStage::Switching => self.roll_back(host, id, true, now_ms),
                // Only an answer or the target's death ends the handover: the target may
                // have installed the state.
                OutStage::Handover | OutStage::Draining => {}
                // The vswitch or target never answered the rollback: resume anyway.
                OutStage::RollingBack { .. } => self.resume(host, id, true),
            }
        }
        let due: Vec<(EndpointAddr, u64)> = self
            .inb
            .iter()
            .filter(|(_, g)| now_ms >= g.deadline_ms)
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            self.drop_in_group(host, k, Release::Discard);
        }
        let done: Vec<FlowKey> = self
            .returning
            .iter()
            .filter(|(_, r)| now_ms >= r.until)
            .map(|(k, _)| *k)
            .collect();
        for k in done {
            self.returning.remove(&k);
            host.remove_pending(&FlowRef::key_only(k));
        }
    }
}

//! The target's side of a migration: pending actors for an announced group, installing
//! the state, giving flows back on an abort, forgetting groups the source gave up.

use super::*;

impl Migrator {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn target_init(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        group: u64,
        chain: Option<String>,
        vswitch: EndpointAddr,
        flows: Vec<MigrateFlow>,
        now_ms: u64,
    ) {
        if self.inb.contains_key(&(from, group)) {
            return; // a repeat
        }
        let refusal = if chain != self.chain {
            Some((
                format!(
                    "the target runs chain `{}`, the flows run `{}`",
                    self.chain.as_deref().unwrap_or("(none)"),
                    chain.as_deref().unwrap_or("(none)")
                ),
                false,
            ))
        } else if self.held >= self.settings.buffer_high_water {
            Some((
                format!("its migration buffer holds {} packets", self.held),
                true,
            ))
        } else {
            None
        };
        if let Some((reason, busy)) = refusal {
            host.send(
                from,
                Message::MigrateReady {
                    group,
                    accepted: Vec::new(),
                    refused: Some(reason),
                    busy,
                },
            );
            return;
        }
        let mut accepted = Vec::with_capacity(flows.len());
        let mut taken = Vec::new();
        let mut aliases = Vec::new();
        let id = self.next_in_id();
        host.prepare_pending(&flows);
        // Only a flow that left this runtime can come back to it: with no tombstone here,
        // there is nothing to reclaim, and no lookup per flow to find that out.
        let reclaiming = !self.tombs.is_empty();
        for f in &flows {
            if reclaiming {
                self.reclaim(host, from, &f.key);
            }
            // The host refuses a key it has, so also one pending already (in this group
            // or another) or one the source took back and that still returns to it.
            let row = host.create_pending(f, vswitch, id);
            if let Some(row) = row {
                taken.push(InFlow { key: f.key, row });
                aliases.extend_from_slice(&f.aliases);
            }
            accepted.push(row.is_some());
        }
        if !taken.is_empty() {
            self.in_ids.insert(id, (from, group));
            self.inb.insert(
                (from, group),
                InGroup {
                    id,
                    deadline_ms: now_ms + self.settings.pending_timeout_ms,
                    vswitch,
                    digest: keys_digest(taken.iter().map(|f| &f.key)),
                    flows: taken,
                    aliases,
                    dropped: 0,
                },
            );
        }
        host.send(
            from,
            Message::MigrateReady {
                group,
                accepted,
                refused: None,
                busy: false,
            },
        );
    }

    /// Step 3 for the group `(from, group)`, an incoming group's key.
    pub(super) fn target_state(
        &mut self,
        host: &mut impl FlowHost,
        (from, group): (EndpointAddr, u64),
        accepted_digest: u64,
        flows: Vec<FlowState>,
        states: &[u8],
        now_ms: u64,
    ) {
        let mut g = self.take_in_group((from, group));
        if let Some(mismatch) = g.take_if(|g| g.digest != accepted_digest) {
            // Source and target do not count this group's flows alike (a stale group, or a
            // bug): matching states by position could install one flow's state in another.
            // None is installed and the source keeps them all, as after an abort: what was
            // held, and what arrives until the vswitch points back, goes back to it.
            self.counters.groups_mismatched += 1;
            self.return_in_group(host, from, group, mismatch, now_ms);
        }
        // Each flow's part of `states`, in order; a part past the end (a malformed
        // message) installs nothing.
        let mut offset = 0usize;
        let mut installed = Vec::with_capacity(flows.len());
        let mut buffered = 0u32;
        // Flows of the group a state arrived for (the rest ended at the source meanwhile).
        let mut arrived = vec![false; g.as_ref().map_or(0, |g| g.flows.len())];
        for st in &flows {
            let end = offset.saturating_add(st.states_len as usize);
            let part = states.get(offset..end);
            offset = end;
            let i = st.idx as usize;
            let ok = match g.as_ref() {
                Some(g) if i < g.flows.len() && !arrived[i] => {
                    arrived[i] = true;
                    let at = g.flows[i].at();
                    let ok = part.is_some_and(|part| host.install(&at, st, part));
                    let how = if ok {
                        Release::Process
                    } else {
                        Release::Return { to: from, group }
                    };
                    let held = host.release_held(&at, how);
                    if ok {
                        buffered += held;
                    } else {
                        host.remove_pending(&at);
                    }
                    self.held = self.held.saturating_sub(held as usize);
                    ok
                }
                _ => false,
            };
            installed.push(ok);
        }
        self.counters.flows_in += installed.iter().filter(|x| **x).count() as u64;
        let dropped = g.as_ref().map(|g| g.dropped).unwrap_or(0);
        // Flows named in step 1 but not in step 3 (they ended at the source meanwhile).
        if let Some(g) = g {
            let left: Vec<InFlow> = g
                .flows
                .into_iter()
                .zip(arrived)
                .filter(|(_, arrived)| !arrived)
                .map(|(f, _)| f)
                .collect();
            if !left.is_empty() {
                self.drop_in_group_flows(host, left, Release::Discard);
            }
        }
        host.send(
            from,
            Message::MigrateDone {
                group,
                installed,
                buffered,
                dropped,
            },
        );
    }

    pub(super) fn target_abort(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        group: u64,
        now_ms: u64,
    ) {
        // The vswitch may point at this runtime a while longer (the source's request to
        // point back travels another path and may be retransmitted): the pending actors
        // stay for as long as one would wait for a state, and whatever reaches them goes
        // back to the source.
        let returned = match self.take_in_group((from, group)) {
            Some(g) => self.return_in_group(host, from, group, g, now_ms),
            None => 0,
        };
        host.send(
            from,
            Message::MigrateAborted {
                group,
                returned,
                owned: Vec::new(),
            },
        );
    }

    /// Gives an incoming group's flows back to the source: what their pending actors hold
    /// goes back now, and what the vswitch still sends here goes back too until the
    /// source has pointed it back (as long as one would wait for a state). Returns how
    /// many packets went back.
    pub(super) fn return_in_group(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        group: u64,
        g: InGroup,
        now_ms: u64,
    ) -> u32 {
        let until = now_ms + self.settings.pending_timeout_ms;
        let mut returned = 0;
        for f in g.flows {
            let n = host.release_held(&f.at(), Release::Return { to: from, group });
            self.held = self.held.saturating_sub(n as usize);
            returned += n;
            // Its actor stays, still marked as arriving in a group that is gone: `on_packet`
            // finds it here first.
            self.returning.insert(
                f.key,
                Returning {
                    to: from,
                    group,
                    until,
                    late: false,
                },
            );
        }
        returned
    }

    /// A later incarnation of a target that died in step 2 or 3 (or, should it have lived,
    /// the same one): none of the group's flows is this runtime's. Actors that packets
    /// meant for the dead incarnation created are ended; packets still on their way go
    /// back to the source for a tombstone's time.
    pub(super) fn target_forget(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        group: u64,
        vswitch: EndpointAddr,
        flows: Vec<MigrateFlow>,
        now_ms: u64,
    ) {
        if self.inb.contains_key(&(from, group)) {
            self.target_abort(host, from, group, now_ms);
            return;
        }
        let until = now_ms + self.settings.tombstone_ms;
        for f in flows {
            let keys = std::iter::once(&f.key).chain(&f.aliases);
            // A flow pending here (in another group) or returning already keeps its actor:
            // `end_stray` spares diverted flows and `create_pending` refuses its keys.
            if keys.clone().any(|k| self.returning.contains_key(k)) {
                continue;
            }
            for k in keys {
                if host.end_stray(k) {
                    self.counters.strays_ended += 1;
                }
            }
            if host.create_pending(&f, vswitch, 0).is_some() {
                // They may overtake what the vswitch sent the source after pointing back:
                // counted there as late.
                self.returning.insert(
                    f.key,
                    Returning {
                        to: from,
                        group,
                        until,
                        late: true,
                    },
                );
            }
        }
    }

    /// Forgets an incoming group's pending actors, returning their packets to the source
    /// or freeing them. Returns how many were returned.
    pub(super) fn drop_in_group(
        &mut self,
        host: &mut impl FlowHost,
        k: (EndpointAddr, u64),
        how: Release,
    ) -> u32 {
        match self.take_in_group(k) {
            Some(g) => self.drop_in_group_flows(host, g.flows, how),
            None => 0,
        }
    }

    /// Removes an incoming group (its id no longer names it).
    pub(super) fn take_in_group(&mut self, k: (EndpointAddr, u64)) -> Option<InGroup> {
        let g = self.inb.remove(&k)?;
        self.in_ids.remove(&g.id);
        Some(g)
    }

    /// An id for a new incoming group that names no other one in flight.
    pub(super) fn next_in_id(&mut self) -> u32 {
        loop {
            let id = self.next_in;
            self.next_in = if u64::from(id) + 1 >= GROUP_ID_LIMIT {
                1
            } else {
                id + 1
            };
            if !self.in_ids.contains_key(&id) {
                return id;
            }
        }
    }

    pub(super) fn drop_in_group_flows(
        &mut self,
        host: &mut impl FlowHost,
        flows: Vec<InFlow>,
        how: Release,
    ) -> u32 {
        let mut n = 0;
        for f in flows {
            let released = host.release_held(&f.at(), how);
            self.held = self.held.saturating_sub(released as usize);
            n += released;
            host.remove_pending(&f.at());
        }
        n
    }
}

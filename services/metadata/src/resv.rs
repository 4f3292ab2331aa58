//! A host's reservation command applied to a pool's configuration: the NVMe reservation model
//! (`duplex_nvme::resv`) over the state the pool keeps for the namespace (ONDISK record 10).
//!
//! [`apply`] is pure: given the pool's configuration and the request it returns the
//! configuration to commit (the namespace's record with its version bumped) and the answer for
//! the fabric, or the answer alone when nothing changes (the model refused the command, or the
//! request names no namespace of the pool). The caller commits, publishes and replies; until
//! the commit succeeds nothing of the answer is sent.

use duplex_ipc::exports::ExportRegistrant;
use duplex_ipc::resv::{
    ResvCommand, ResvCtrl, ResvDone, ResvNotice, ResvReply, ResvRequest, ResvStateMsg,
};
use duplex_nvme::resv::{Acquire, HostCtrl, HostId, Register, Release, Reservations, ResvState};
use duplex_ondisk::{PoolConfig, Reservation, ReservationRegistrant};

/// What a request does to a pool.
#[derive(Debug)]
pub enum Applied {
    /// Commit this configuration, then answer with this.
    Commit(Box<PoolConfig>, ResvDone),
    /// Answer with this; nothing to commit.
    Answer(ResvReply),
}

/// Whether `cfg` exports namespace `nsid` of `subnqn`.
pub fn has_namespace(cfg: &PoolConfig, subnqn: &str, nsid: u32) -> bool {
    cfg.namespaces
        .iter()
        .any(|n| n.subsystem_nqn == subnqn && n.nsid == nsid)
}

fn model_of(r: &Reservation) -> Result<Reservations, String> {
    let state = ResvState::from_kept(
        r.registrants.iter().map(|g| (g.host_id, g.cntlid, g.key)),
        r.rtype,
        r.holder,
        r.generation,
        r.ptpl,
    );
    Reservations::from_state(&state).map_err(|e| {
        format!(
            "the reservation state kept for namespace {} of {} is not one it can be in ({e}); refusing to change it",
            r.nsid, r.subnqn
        )
    })
}

fn record_of(m: &Reservations, subnqn: &str, nsid: u32, version: u64) -> Reservation {
    let s = m.state();
    Reservation {
        subnqn: subnqn.to_owned(),
        nsid,
        version,
        generation: s.generation,
        rtype: s.rtype.map_or(0, |t| t as u8),
        ptpl: s.ptpl,
        holder: s.holder.map_or([0; 16], |h| h.0),
        registrants: s
            .registrants
            .iter()
            .map(|g| ReservationRegistrant {
                host_id: g.host.0,
                key: g.key,
                cntlid: g.cntlid,
            })
            .collect(),
    }
}

/// The state message of record `r` (or of none).
pub fn state_msg(r: Option<&Reservation>) -> ResvStateMsg {
    r.map_or_else(ResvStateMsg::default, |r| ResvStateMsg {
        version: r.version,
        generation: r.generation,
        rtype: r.rtype,
        ptpl: r.ptpl,
        holder: r.holder,
        registrants: r
            .registrants
            .iter()
            .map(|g| ExportRegistrant {
                host_id: g.host_id,
                key: g.key,
                cntlid: g.cntlid,
            })
            .collect(),
    })
}

fn ctrl(c: HostCtrl) -> ResvCtrl {
    ResvCtrl {
        host_id: c.host.0,
        cntlid: c.cntlid,
    }
}

/// Applies `req` to `cfg` (which must export the namespace; see [`has_namespace`]).
pub fn apply(cfg: &PoolConfig, req: &ResvRequest) -> Applied {
    if !has_namespace(cfg, &req.subnqn, req.nsid) {
        return Applied::Answer(ResvReply::Error(format!(
            "pool {} exports no namespace {} of {}",
            cfg.pool.name, req.nsid, req.subnqn
        )));
    }
    if req.host_id == [0; 16] {
        return Applied::Answer(ResvReply::Error(
            "a host without a host identifier cannot take part in reservations".into(),
        ));
    }
    let kept = cfg
        .reservations
        .iter()
        .position(|r| r.subnqn == req.subnqn && r.nsid == req.nsid);
    let current = kept.map(|i| &cfg.reservations[i]);
    let mut model = match current.map(model_of).transpose() {
        Ok(m) => m.unwrap_or_default(),
        Err(e) => return Applied::Answer(ResvReply::Error(e)),
    };
    let who = HostCtrl {
        host: HostId(req.host_id),
        cntlid: req.cntlid,
    };
    let refused = |status: duplex_nvme::status::Status| {
        Applied::Answer(ResvReply::Done(ResvDone {
            status: status.0,
            state: state_msg(current),
            aborts: Vec::new(),
            notices: Vec::new(),
        }))
    };
    let outcome = match &req.command {
        ResvCommand::Register { cdw10, data } => {
            Register::decode(*cdw10, data).and_then(|c| model.register(who, &c))
        }
        ResvCommand::Acquire { cdw10, data } => {
            Acquire::decode(*cdw10, data).and_then(|c| model.acquire(who.host, &c))
        }
        ResvCommand::Release { cdw10, data } => {
            Release::decode(*cdw10, data).and_then(|c| model.release(who.host, &c))
        }
        ResvCommand::SetPtpl(on) => {
            model.set_ptpl(*on);
            Ok(duplex_nvme::resv::Outcome::default())
        }
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(status) => return refused(status),
    };
    let version = current.map_or(0, |r| r.version) + 1;
    let record = record_of(&model, &req.subnqn, req.nsid, version);
    let mut next = cfg.clone();
    match kept {
        Some(i) => next.reservations[i] = record,
        None => next.reservations.push(record),
    }
    let state = state_msg(
        next.reservations
            .iter()
            .find(|r| r.subnqn == req.subnqn && r.nsid == req.nsid),
    );
    Applied::Commit(
        Box::new(next),
        ResvDone {
            status: 0,
            state,
            aborts: outcome.abort.into_iter().map(ctrl).collect(),
            notices: outcome
                .notices
                .into_iter()
                .map(|n| ResvNotice {
                    to: ctrl(n.to),
                    kind: n.kind as u8,
                })
                .collect(),
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn cfg() -> PoolConfig {
        PoolConfig {
            pool: duplex_ondisk::Pool {
                name: "p".into(),
                uuid: duplex_ondisk::Uuid([1; 16]),
                raid_level: duplex_ondisk::RaidLevel::Raid1,
                chunk_size: 65536,
                member_data_bytes: 1 << 30,
                members: Vec::new(),
            },
            ownership: duplex_ondisk::Ownership {
                owner_node: 0,
                epoch: 1,
            },
            cluster_generation: 1,
            subsystems: Vec::new(),
            volumes: Vec::new(),
            namespaces: vec![duplex_ondisk::Namespace {
                subsystem_nqn: "nqn.s".into(),
                nsid: 1,
                volume_uuid: duplex_ondisk::Uuid([2; 16]),
                ana_group: 1,
            }],
            spares: Vec::new(),
            write_seq_mark: 0,
            checksum_area: None,
            reservations: Vec::new(),
            host_secrets: Vec::new(),
        }
    }

    fn req(host: u8, command: ResvCommand) -> ResvRequest {
        ResvRequest {
            subnqn: "nqn.s".into(),
            nsid: 1,
            host_id: [host; 16],
            cntlid: 0xFFFF,
            command,
        }
    }

    fn register(key: u64) -> ResvCommand {
        let mut data = vec![0; 16];
        data[8..].copy_from_slice(&key.to_le_bytes());
        ResvCommand::Register { cdw10: 0, data }
    }

    fn commit(c: &PoolConfig, r: &ResvRequest) -> (PoolConfig, ResvDone) {
        match apply(c, r) {
            Applied::Commit(c, d) => (*c, d),
            Applied::Answer(a) => panic!("not committed: {a:?}"),
        }
    }

    #[test]
    fn a_register_then_acquire_is_kept_in_the_record_with_its_version() {
        let (c, d) = commit(&cfg(), &req(1, register(0xAA)));
        assert_eq!((d.status, d.state.version, d.state.generation), (0, 1, 1));
        assert_eq!(c.reservations.len(), 1);
        let mut data = vec![0; 16];
        data[..8].copy_from_slice(&0xAAu64.to_le_bytes());
        // Acquire, Write Exclusive (type 1 in bits 15:8).
        let (c, d) = commit(
            &c,
            &req(
                1,
                ResvCommand::Acquire {
                    cdw10: 1 << 8,
                    data,
                },
            ),
        );
        assert_eq!((d.status, d.state.version, d.state.rtype), (0, 2, 1));
        assert_eq!(d.state.holder, [1; 16]);
        assert_eq!(c.reservations[0].holder, [1; 16]);
        // Another host's acquire with a key it never registered: the model's conflict, nothing
        // to commit.
        let mut data = vec![0; 16];
        data[..8].copy_from_slice(&0xBBu64.to_le_bytes());
        match apply(
            &c,
            &req(
                2,
                ResvCommand::Acquire {
                    cdw10: 1 << 8,
                    data,
                },
            ),
        ) {
            Applied::Answer(ResvReply::Done(d)) => {
                assert_eq!(d.status, duplex_nvme::resv::RESERVATION_CONFLICT.0);
                assert_eq!(d.state.version, 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_for_other_namespaces_or_without_a_host_id_are_refused() {
        let mut r = req(1, register(1));
        r.nsid = 2;
        assert!(matches!(
            apply(&cfg(), &r),
            Applied::Answer(ResvReply::Error(_))
        ));
        assert!(matches!(
            apply(&cfg(), &req(0, register(1))),
            Applied::Answer(ResvReply::Error(_))
        ));
    }

    #[test]
    fn a_record_no_command_could_leave_is_refused_not_changed() {
        let mut c = cfg();
        c.reservations.push(Reservation {
            subnqn: "nqn.s".into(),
            nsid: 1,
            version: 3,
            generation: 1,
            rtype: 1,
            ptpl: false,
            holder: [9; 16],
            registrants: Vec::new(),
        });
        match apply(&c, &req(1, register(1))) {
            Applied::Answer(ResvReply::Error(e)) => {
                assert!(e.contains("not one it can be in"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_ptpl_is_kept() {
        let (c, d) = commit(&cfg(), &req(1, ResvCommand::SetPtpl(true)));
        assert!(d.state.ptpl && c.reservations[0].ptpl);
    }
}

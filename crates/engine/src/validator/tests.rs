//! The validator and miner engines driven together with a fake clock, no I/O.

use super::*;
use crate::miner::{MinerEffect, MinerEngine, MinerInput, MinerPolicy};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tunenet_types::{Decision, HparamBounds, RejectCode, RejectReason};

const BUDGET: u64 = 10_000;

fn plan(jobs: usize, miners_per_job: u32) -> CompetitionPlan {
    CompetitionPlan {
        id: CompetitionId::new("c").unwrap(),
        jobs: (0..jobs)
            .map(|i| JobPlan {
                job_id: JobId::new(format!("c-{i}")).unwrap(),
                base_model: BlobId::of(b"model"),
                base_params: 1000,
                train_shard: BlobId::of(format!("shard{i}").as_bytes()),
                shard_records: 10,
                time_budget_ms: BUDGET,
                reward_hint: 1.0,
                model_config: String::new(),
            })
            .collect(),
        miners_per_job,
        concurrent_jobs: 1,
        hparams: HparamBounds::default(),
        scoring: ScoringWeights::default(),
        reveal_window_ms: 5_000,
        offer_timeout_ms: 2_000,
        max_artifact_bytes: 1_000,
        reply_to: "http://v".into(),
        hardware: "cpu".into(),
        integrity: IntegritySettings::default(),
        requires_synthetic: false,
    }
}

fn eval(loss: f64, sketch: Vec<f32>) -> Result<Evaluation, String> {
    Ok(Evaluation {
        test_loss: Some(loss),
        synthetic_loss: None,
        verdicts: vec![],
        sketch,
        ..Default::default()
    })
}

struct World {
    v: ValidatorEngine,
    miners: Vec<(String, MinerEngine)>,
    ids: Vec<Identity>,
    rng: StdRng,
    now: UnixMillis,
}

impl World {
    fn new(n_miners: usize, jobs: usize) -> World {
        let ids: Vec<Identity> = (0..n_miners).map(|_| Identity::generate()).collect();
        let miners: Vec<(String, MinerEngine)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    format!("m{i}"),
                    MinerEngine::new(id.clone(), MinerPolicy::default(), vec![]),
                )
            })
            .collect();
        let addrs = miners.iter().map(|(a, _)| a.clone()).collect();
        World {
            v: ValidatorEngine::new(
                Identity::generate(),
                plan(jobs, n_miners as u32),
                addrs,
                vec![],
            ),
            miners,
            ids,
            rng: StdRng::seed_from_u64(1),
            now: 1_000_000,
        }
    }

    /// Ticks the validator and delivers offers and assignments to the miners.
    fn tick(&mut self) -> Vec<ValidatorEffect> {
        let fx = self.v.handle(ValidatorInput::Tick, self.now, &mut self.rng);
        self.deliver(fx)
    }

    fn deliver(&mut self, fx: Vec<ValidatorEffect>) -> Vec<ValidatorEffect> {
        let mut rest = vec![];
        for e in fx {
            match e {
                ValidatorEffect::SendOffer { addr, offer } => {
                    let m = &mut self.miners.iter_mut().find(|(a, _)| *a == addr).unwrap().1;
                    let (job_id, validator) = (offer.job_id.clone(), offer.validator.clone());
                    let (decision, _) = m.offer(offer, self.now, None);
                    let reply = Ok(m.reply(job_id.clone(), &validator, decision));
                    let more = self.v.handle(
                        ValidatorInput::Decision {
                            job_id,
                            addr,
                            reply,
                        },
                        self.now,
                        &mut self.rng,
                    );
                    rest.extend(self.deliver(more));
                }
                ValidatorEffect::SendAssignment { addr, assignment } => {
                    let m = &mut self.miners.iter_mut().find(|(a, _)| *a == addr).unwrap().1;
                    m.assign(assignment, self.now).unwrap();
                }
                other => rest.push(other),
            }
        }
        rest
    }
}

/// Trains "instantly" and returns the commitment effect's commitment.
fn train(
    m: &mut MinerEngine,
    job: &JobId,
    artifact: &[u8],
    now: UnixMillis,
    rng: &mut StdRng,
) -> Commitment {
    let fx = m.handle(
        MinerInput::Trained {
            job_id: job.clone(),
            result: Ok((BlobId::of(artifact), artifact.len() as u64)),
        },
        now,
        rng,
    );
    fx.into_iter()
        .find_map(|e| match e {
            MinerEffect::SendCommit { commitment, .. } => Some(commitment),
            _ => None,
        })
        .expect("a commitment")
}

fn job0() -> JobId {
    JobId::new("c-0").unwrap()
}

#[test]
fn full_job_scores_follow_loss_with_mean_one() {
    let mut w = World::new(3, 1);
    w.tick();
    assert!(matches!(
        w.v.job(&job0()).unwrap().phase,
        JobPhase::Running { .. }
    ));
    assert_eq!(w.v.job(&job0()).unwrap().slots.len(), 3);
    let mut headers = vec![];
    for i in 0..3 {
        let art = format!("artifact-{i}");
        let now = w.now + 100;
        let c = train(&mut w.miners[i].1, &job0(), art.as_bytes(), now, &mut w.rng);
        let (receipt, _) = w.v.commit(c, now).unwrap();
        receipt.verify().unwrap();
        let fx = w.miners[i].1.handle(
            MinerInput::CommitAnswered {
                job_id: job0(),
                result: Ok(receipt),
            },
            now,
            &mut w.rng,
        );
        assert!(
            !fx.iter().any(|e| matches!(e, MinerEffect::Upload { .. })),
            "no reveal before the deadline"
        );
        let fx = w.miners[i]
            .1
            .handle(MinerInput::Tick, w.now + BUDGET + 1, &mut w.rng);
        let h = fx
            .into_iter()
            .find_map(|e| match e {
                MinerEffect::Upload { header, .. } => Some(header),
                _ => None,
            })
            .unwrap();
        headers.push(h);
    }
    w.now += BUDGET + 1;
    w.tick();
    for (i, h) in headers.iter().enumerate() {
        let fx = w.v.uploaded(h, w.now, &mut w.rng).unwrap();
        assert!(
            fx.iter()
                .any(|e| matches!(e, ValidatorEffect::Evaluate { .. }))
        );
        let fx = w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: h.miner.clone(),
                result: eval(2.0 + i as f64, vec![i as f32 + 1.0, 0.0, (i * i) as f32]),
            },
            w.now,
            &mut w.rng,
        );
        if i == 2 {
            assert!(
                fx.iter()
                    .any(|e| matches!(e, ValidatorEffect::JobFinished { .. }))
            );
            assert!(
                fx.iter()
                    .any(|e| matches!(e, ValidatorEffect::CompetitionFinished(_)))
            );
        }
    }
    let job = w.v.job(&job0()).unwrap();
    assert_eq!(job.phase, JobPhase::Done { note: None });
    let mean: f64 = job.scores.iter().map(|s| s.quality).sum::<f64>() / 3.0;
    assert!((mean - 1.0).abs() < 1e-9);
    let best = job
        .scores
        .iter()
        .max_by(|a, b| a.quality.total_cmp(&b.quality))
        .unwrap();
    assert_eq!(best.loss, Some(2.0));
    // A replay under the formula in force gives the stored scores back exactly.
    let (again, jobs) = crate::replay_scores(w.v.jobs(), &w.v.plan().scoring);
    assert_eq!((again.as_slice(), jobs), (job.scores.as_slice(), 1));
}

#[test]
fn commit_refusals_name_the_cause() {
    let mut w = World::new(2, 1);
    w.tick();
    let now = w.now + 10;
    let good = train(&mut w.miners[0].1, &job0(), b"a", now, &mut w.rng);

    let mut unknown = good.clone();
    unknown.job_id = JobId::new("nope").unwrap();
    assert!(matches!(
        w.v.commit(unknown, now),
        Err(ValidatorError::UnknownJob(_))
    ));

    let mut forged = good.clone();
    forged.artifact_size += 1; // signature no longer covers the fields
    assert!(matches!(
        w.v.commit(forged, now),
        Err(ValidatorError::BadSignature(_))
    ));

    let stranger = Identity::generate();
    let mut other = good.clone();
    other.miner = stranger.peer_id();
    other.miner_key = stranger.public_key_bytes();
    other.signature = stranger.sign(&other.signing_bytes());
    assert!(matches!(
        w.v.commit(other, now),
        Err(ValidatorError::NotAssigned { .. })
    ));

    let big = {
        let m = &mut w.miners[1].1;
        train(m, &job0(), &vec![0u8; 2_000], now, &mut w.rng)
    };
    assert!(matches!(
        w.v.commit(big, now),
        Err(ValidatorError::TooLarge {
            size: 2000,
            limit: 1000
        })
    ));

    let late = w.now + BUDGET + 1;
    let err = w.v.commit(good.clone(), late).unwrap_err();
    assert!(matches!(err, ValidatorError::TooLate { .. }), "{err}");
    assert!(err.to_string().contains("after the deadline"));
    // Nothing refused was recorded.
    assert!(
        w.v.job(&job0())
            .unwrap()
            .slots
            .values()
            .all(|s| s.commitment.is_none())
    );
    w.v.commit(good, now).unwrap();
}

#[test]
fn upload_checks_bind_to_the_commitment() {
    let mut w = World::new(1, 1);
    w.tick();
    let now = w.now + 10;
    let c = train(&mut w.miners[0].1, &job0(), b"real", now, &mut w.rng);
    let (receipt, _) = w.v.commit(c, now).unwrap();
    w.miners[0].1.handle(
        MinerInput::CommitAnswered {
            job_id: job0(),
            result: Ok(receipt),
        },
        now,
        &mut w.rng,
    );
    let fx = w.miners[0]
        .1
        .handle(MinerInput::Tick, w.now + BUDGET + 1, &mut w.rng);
    let h = fx
        .into_iter()
        .find_map(|e| match e {
            MinerEffect::Upload { header, .. } => Some(header),
            _ => None,
        })
        .unwrap();
    assert!(matches!(
        w.v.check_upload(&h, now),
        Err(ValidatorError::TooEarly { .. })
    ));
    w.now += BUDGET + 1;
    w.tick();
    let mut swapped = h.clone();
    swapped.artifact = BlobId::of(b"fake");
    assert!(matches!(
        w.v.check_upload(&swapped, w.now),
        Err(ValidatorError::CommitMismatch(_))
    ));
    let mut salted = h.clone();
    salted.salt[0] ^= 1;
    assert!(matches!(
        w.v.check_upload(&salted, w.now),
        Err(ValidatorError::CommitMismatch(_))
    ));
    w.v.uploaded(&h, w.now, &mut w.rng).unwrap();
    assert!(matches!(
        w.v.check_upload(&h, w.now),
        Err(ValidatorError::AlreadyUploaded { .. })
    ));
}

#[test]
fn missing_commit_and_reveal_get_the_penalty_with_reasons() {
    let mut w = World::new(2, 1);
    w.tick();
    let now = w.now + 10;
    // Miner 0 commits but never reveals; miner 1 never commits.
    let c = train(&mut w.miners[0].1, &job0(), b"x", now, &mut w.rng);
    w.v.commit(c, now).unwrap();
    w.now += BUDGET + 1;
    w.tick();
    w.now += 5_001;
    let fx = w.tick();
    assert!(
        fx.iter()
            .any(|e| matches!(e, ValidatorEffect::JobFinished { .. }))
    );
    let job = w.v.job(&job0()).unwrap();
    let reasons: Vec<String> = job
        .scores
        .iter()
        .filter_map(|s| s.penalty_reason.clone())
        .collect();
    assert_eq!(reasons.len(), 2);
    assert!(reasons.iter().any(|r| r.contains("no commitment")));
    assert!(reasons.iter().any(|r| r.contains("not revealed")));
    assert!(job.scores.iter().all(|s| s.quality == 0.0));
}

#[test]
fn rejections_are_recorded_and_an_unwanted_job_ends() {
    let mut w = World::new(1, 2);
    w.miners[0].1.set_policy(MinerPolicy {
        paused: true,
        ..MinerPolicy::default()
    });
    w.tick();
    let job = w.v.job(&job0()).unwrap();
    match job.offers.values().next().unwrap() {
        OfferState::Rejected { reason, .. } => assert!(reason.contains("paused"), "{reason}"),
        o => panic!("expected a rejection, got {o:?}"),
    }
    assert!(
        matches!(&job.phase, JobPhase::Done { note: Some(n) } if n.contains("no miner accepted"))
    );
    // The next job starts on the following tick.
    w.tick();
    assert!(!matches!(
        w.v.job(&JobId::new("c-1").unwrap()).unwrap().phase,
        JobPhase::Pending
    ));
}

#[test]
fn restored_engine_resumes_evaluation_and_keeps_state() {
    let mut w = World::new(1, 1);
    w.tick();
    let now = w.now + 10;
    let c = train(&mut w.miners[0].1, &job0(), b"keep", now, &mut w.rng);
    w.v.commit(c, now).unwrap();
    let mut fx = w.miners[0].1.handle(MinerInput::Tick, now, &mut w.rng);
    assert!(fx.is_empty());
    w.now += BUDGET + 1;
    fx = w.miners[0].1.handle(MinerInput::Tick, w.now, &mut w.rng);
    assert!(fx.is_empty(), "no receipt yet, so no reveal");
    let stored: Vec<JobState> = w.v.jobs().cloned().collect();
    let mut v2 = ValidatorEngine::new(Identity::generate(), plan(1, 1), vec!["m0".into()], stored);
    assert_eq!(v2.job(&job0()), w.v.job(&job0()));
    let fx = v2.handle(ValidatorInput::Tick, w.now, &mut w.rng);
    assert!(
        fx.iter()
            .all(|e| !matches!(e, ValidatorEffect::SendOffer { .. })),
        "a restored job is not re-offered"
    );
    assert!(matches!(
        v2.job(&job0()).unwrap().phase,
        JobPhase::Revealing { .. }
    ));
}

/// A validator killed between storing a job's assignments and sending them came back with
/// the slots waiting for commitments no miner could make (each got the penalty at the
/// deadline): a restart sends them again while the deadline is ahead, and a miner that
/// already has one takes the repeat as a no-op.
#[test]
fn a_restarted_validator_sends_its_assignments_again_until_the_deadline() {
    let mut w = World::new(2, 1);
    w.tick();
    let now = w.now + 10;
    let c = train(&mut w.miners[0].1, &job0(), b"one", now, &mut w.rng);
    w.v.commit(c, now).unwrap();
    let stored: Vec<JobState> = w.v.jobs().cloned().collect();
    let deadline = match stored[0].phase {
        JobPhase::Running { deadline } => deadline,
        ref p => panic!("{p:?}"),
    };
    let v2 = ValidatorEngine::new(
        Identity::generate(),
        plan(1, 2),
        vec!["m0".into(), "m1".into()],
        stored,
    );
    let again: Vec<(String, Assignment)> = v2
        .resume(now + 20)
        .into_iter()
        .filter_map(|e| match e {
            ValidatorEffect::SendAssignment { addr, assignment } => Some((addr, assignment)),
            _ => None,
        })
        .collect();
    // m0 has committed already; m1 has not.
    assert_eq!(again.len(), 1, "{again:?}");
    let (addr, a) = again[0].clone();
    assert_eq!(addr, "m1");
    // m1 had it: a no-op that keeps it training.
    let m1 = &mut w.miners[1].1;
    assert_eq!(m1.assign(a.clone(), now + 30), Ok(vec![]));
    assert_eq!(m1.job(&job0()).unwrap().phase, crate::MinerPhase::Training);
    // m1 never got it (the validator died before sending): it trains now.
    let mut fresh = m1.job(&job0()).unwrap().clone();
    fresh.phase = crate::MinerPhase::Accepted { at: now };
    fresh.assignment = None;
    let mut m1b = MinerEngine::new(w.ids[1].clone(), MinerPolicy::default(), vec![fresh]);
    let fx = m1b.assign(a, now + 30).unwrap();
    assert!(
        fx.iter().any(|e| matches!(e, MinerEffect::Train { .. })),
        "{fx:?}"
    );
    // Past the deadline nothing is sent.
    assert!(
        v2.resume(deadline + 1)
            .iter()
            .all(|e| !matches!(e, ValidatorEffect::SendAssignment { .. }))
    );
}

/// An assignment whose answer was lost on the way back (the link dropped after the miner
/// had it) must not fail a slot whose commitment is already here; a slot still waiting
/// fails with the reason.
#[test]
fn a_failed_assignment_fails_only_a_slot_still_waiting() {
    let mut w = World::new(2, 1);
    w.tick();
    let now = w.now + 10;
    let c = train(&mut w.miners[0].1, &job0(), b"one", now, &mut w.rng);
    w.v.commit(c, now).unwrap();
    let (m0, m1) = (w.ids[0].peer_id(), w.ids[1].peer_id());
    for miner in [m0.clone(), m1.clone()] {
        w.v.handle(
            ValidatorInput::Assigned {
                job_id: job0(),
                miner,
                result: Err("Connection was closed before a response was received".into()),
            },
            now + 20,
            &mut w.rng,
        );
    }
    let job = w.v.job(&job0()).unwrap();
    assert_eq!(job.slots[&m0].submission, SubmissionState::Waiting);
    assert!(job.slots[&m0].commitment.is_some());
    match &job.slots[&m1].submission {
        SubmissionState::Failed { reason, .. } => {
            assert!(reason.contains("could not be delivered"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn miner_policy_rejects_with_reasons() {
    let p = MinerPolicy {
        max_model_params: 10,
        min_time_budget_secs: 20,
        ..MinerPolicy::default()
    };
    let mut o = Offer {
        job_id: job0(),
        competition_id: CompetitionId::new("c").unwrap(),
        kind: JobKind::FineTune,
        validator: Identity::generate().peer_id(),
        base_model: BlobId::of(b"m"),
        base_params: 100,
        dataset_records: 1,
        time_budget_ms: 60_000,
        reward_hint: 0.0,
        hardware: "cpu".into(),
        reply_to: "x".into(),
        model_config: String::new(),
        inference: None,
        validator_key: vec![],
        signature: vec![],
    };
    let code = |d: Decision| match d {
        Decision::Reject(r) => r.code,
        Decision::Accept => panic!("accepted"),
    };
    assert_eq!(code(p.decide(&o, 0, None)), RejectCode::ModelTooLarge);
    o.base_params = 5;
    assert_eq!(code(p.decide(&o, 1, None)), RejectCode::Busy);
    o.time_budget_ms = 5_000;
    assert_eq!(code(p.decide(&o, 0, None)), RejectCode::BudgetTooShort);
    o.time_budget_ms = 60_000;
    o.kind = JobKind::Inference;
    assert_eq!(code(p.decide(&o, 0, None)), RejectCode::KindNotSupported);
    o.kind = JobKind::FineTune;
    assert_eq!(p.decide(&o, 0, None), Decision::Accept);
    let small = MinerPolicy {
        max_memory_gb: Some(1.0),
        ..p.clone()
    };
    assert_eq!(
        code(small.decide(&o, 0, Some(3 << 30))),
        RejectCode::InsufficientMemory
    );
    assert_eq!(small.decide(&o, 0, Some(1 << 29)), Decision::Accept);
    // A miner that lists its validators takes no offer from another.
    let listed = MinerPolicy {
        validators: vec![Identity::generate().peer_id().0],
        ..p.clone()
    };
    match listed.decide(&o, 0, None) {
        Decision::Reject(r) => {
            assert_eq!(r.code, RejectCode::Other);
            assert!(r.detail.contains("not one this miner works for"), "{r}");
        }
        Decision::Accept => panic!("an unlisted validator's offer was taken"),
    }
    let listed = MinerPolicy {
        validators: vec![o.validator.0.clone()],
        ..p.clone()
    };
    assert_eq!(listed.decide(&o, 0, None), Decision::Accept);
}

#[test]
fn miner_refuses_forged_or_foreign_assignments() {
    let mut w = World::new(1, 1);
    // Offer directly, then tamper with the assignment the validator sends.
    let offer = first_offer(&mut w);
    let m = &mut w.miners[0].1;
    let validator = offer.validator.clone();
    let (d, _) = m.offer(offer, w.now, None);
    assert_eq!(d, Decision::Accept);
    let reply = Ok(m.reply(job0(), &validator, d));
    let fx = w.v.handle(
        ValidatorInput::Decision {
            job_id: job0(),
            addr: "m0".into(),
            reply,
        },
        w.now,
        &mut w.rng,
    );
    let a = fx
        .into_iter()
        .find_map(|e| match e {
            ValidatorEffect::SendAssignment { assignment, .. } => Some(assignment),
            _ => None,
        })
        .unwrap();
    let m = &mut w.miners[0].1;
    let mut forged = a.clone();
    forged.deadline_ms += 1_000_000;
    assert!(matches!(
        m.assign(forged, w.now),
        Err(crate::MinerError::BadSignature(_))
    ));
    let mut foreign = a.clone();
    foreign.miner = Identity::generate().peer_id();
    assert!(matches!(
        m.assign(foreign, w.now),
        Err(crate::MinerError::WrongMiner(_))
    ));
    // Arriving after its deadline looks like a clock ahead by as much (the first
    // assignment from a validator is this miner's only measure of its clock), up to
    // `MAX_CLOCK_OFFSET_MS`; past that it is refused.
    assert!(matches!(
        m.assign(
            a.clone(),
            a.deadline_ms + crate::miner::MAX_CLOCK_OFFSET_MS as u64
        ),
        Err(crate::MinerError::Expired(_))
    ));
    m.assign(a, w.now).unwrap();
}

#[test]
fn a_job_id_held_for_one_validator_is_refused_to_another_until_it_ends() {
    let mut w = World::new(1, 1);
    let offer = first_offer(&mut w);
    let m = &mut w.miners[0].1;
    m.set_policy(MinerPolicy {
        max_concurrent_jobs: 4,
        ..MinerPolicy::default()
    });
    let (d, _) = m.offer(offer.clone(), w.now, None);
    assert_eq!(d, Decision::Accept);
    // Another validator running the same competition offers the same job id.
    let other = Identity::generate();
    let mut theirs = offer.clone();
    theirs.validator = other.peer_id();
    theirs.sign(&other);
    let (d, _) = m.offer(theirs.clone(), w.now, None);
    match d {
        Decision::Reject(r) => assert!(
            r.detail.contains("held for one validator at a time")
                && r.detail.contains(&offer.validator.0),
            "{r}"
        ),
        Decision::Accept => panic!("the first validator's job would be overwritten"),
    }
    // The first validator's job is untouched, and its re-sent offer is still taken.
    assert_eq!(m.offer(offer.clone(), w.now, None).0, Decision::Accept);
    assert_eq!(
        m.job(&offer.job_id).unwrap().offer.validator,
        offer.validator
    );
}

#[test]
fn the_offer_gate_refuses_exactly_what_the_engine_would() {
    let mut w = World::new(1, 1);
    let offer = first_offer(&mut w);
    let other = Identity::generate();
    let with = |f: &dyn Fn(&mut Offer)| {
        let mut o = offer.clone();
        f(&mut o);
        o
    };
    let offers = [
        offer.clone(),
        with(&|o| o.job_id = JobId::new("c-9").unwrap()),
        with(&|o| o.kind = JobKind::Inference),
        with(&|o| o.base_params = u64::MAX),
        with(&|o| o.time_budget_ms = 1),
        with(&|o| {
            o.validator = other.peer_id();
            o.sign(&other);
        }),
    ];
    let m = &mut w.miners[0].1;
    let mut refused = 0;
    for policy in [
        MinerPolicy::default(),
        MinerPolicy {
            paused: true,
            ..MinerPolicy::default()
        },
        MinerPolicy {
            max_concurrent_jobs: 2,
            ..MinerPolicy::default()
        },
    ] {
        m.set_policy(policy);
        // Before and after the first job is taken: every refusal the gate gives is the
        // engine's own, word for word; what the gate lets through, the engine decides.
        for round in 0..2 {
            for (k, o) in offers.iter().enumerate() {
                let gate = m.offer_gate().refusal(o);
                let (d, _) = m.offer(o.clone(), w.now, None);
                if let Some(g) = gate {
                    assert_eq!(g, d, "round {round} offer {k}");
                    refused += 1;
                }
            }
            let _ = m.offer(offer.clone(), w.now, None);
        }
    }
    assert!(refused >= 8, "the gate refused {refused} offers");
}

#[test]
fn a_miner_takes_only_offers_signed_by_the_validator_they_name() {
    let mut w = World::new(1, 1);
    let offer = first_offer(&mut w);
    offer.verify().unwrap();
    let forged = |f: &dyn Fn(&mut Offer)| {
        let mut o = offer.clone();
        f(&mut o);
        o
    };
    let impostor = Identity::generate();
    let cases = [
        // Sent first by someone else, to have the commitment sent to them.
        forged(&|o| o.reply_to = "http://attacker:1".into()),
        forged(&|o| o.time_budget_ms += 1),
        forged(&|o| {
            o.validator_key = vec![];
            o.signature = vec![];
        }),
        // Signed, but by another key than the named validator's.
        forged(&|o| o.sign(&impostor)),
    ];
    let m = &mut w.miners[0].1;
    for (k, o) in cases.into_iter().enumerate() {
        let (d, fx) = m.offer(o, w.now, None);
        match d {
            Decision::Reject(r) => assert!(
                r.detail.contains("not signed by the validator it names"),
                "{k}: {r}"
            ),
            Decision::Accept => panic!("forged offer {k} was taken"),
        }
        assert!(!fx.iter().any(|e| matches!(e, MinerEffect::Persist(_))));
    }
    // The real one is still taken, with the validator's own reply_to.
    let (d, _) = m.offer(offer.clone(), w.now, None);
    assert_eq!(d, Decision::Accept);
    assert_eq!(m.job(&job0()).unwrap().offer.reply_to, offer.reply_to);
}

#[test]
fn an_acceptance_not_signed_by_the_miner_it_names_gets_no_slot() {
    // Two miners: the second one's answer is still awaited, so the job stays open.
    let mut w = World::new(2, 1);
    let offer = first_offer(&mut w);
    let victim = w.miners[0].1.peer_id();
    let impostor = Identity::generate();
    // In the victim's name: unsigned, signed by the impostor's own key, signed for another
    // validator, and the victim's signed refusal turned into an acceptance.
    let unsigned = DecisionReply::unsigned(job0(), victim.clone(), Decision::Accept);
    let mut own_key = DecisionReply::signed(&impostor, job0(), &offer.validator, Decision::Accept);
    own_key.miner = victim.clone();
    let m = &mut w.miners[0].1;
    let elsewhere = m.reply(job0(), &Identity::generate().peer_id(), Decision::Accept);
    let mut flipped = m.reply(
        job0(),
        &offer.validator,
        Decision::Reject(RejectReason {
            code: RejectCode::Busy,
            detail: String::new(),
        }),
    );
    flipped.decision = Decision::Accept;
    for (k, forged) in [unsigned, own_key, elsewhere, flipped]
        .into_iter()
        .enumerate()
    {
        let fx = w.v.handle(
            ValidatorInput::Decision {
                job_id: job0(),
                addr: "m0".into(),
                reply: Ok(forged),
            },
            w.now,
            &mut w.rng,
        );
        assert!(
            !fx.iter()
                .any(|e| matches!(e, ValidatorEffect::SendAssignment { .. })),
            "forgery {k} was assigned"
        );
        let job = w.v.job(&job0()).unwrap();
        match job.offers.get("m0") {
            Some(OfferState::Failed { error }) => {
                assert!(
                    error.contains("not signed by the miner it names"),
                    "{error}"
                )
            }
            other => panic!("forgery {k}: {other:?}"),
        }
        // Put the offer back as sent for the next forgery.
        w.v.jobs
            .get_mut(&job0())
            .unwrap()
            .offers
            .insert("m0".into(), OfferState::Sent);
    }
    // The real, signed acceptances still get the slots.
    let mut fx = vec![];
    for (k, addr) in ["m0", "m1"].into_iter().enumerate() {
        let m = &mut w.miners[k].1;
        let (d, _) = m.offer(offer.clone(), w.now, None);
        let reply = Ok(m.reply(job0(), &offer.validator, d));
        fx = w.v.handle(
            ValidatorInput::Decision {
                job_id: job0(),
                addr: addr.into(),
                reply,
            },
            w.now,
            &mut w.rng,
        );
    }
    assert!(fx.iter().any(|e| matches!(
        e,
        ValidatorEffect::SendAssignment { addr, assignment }
            if addr == "m0" && assignment.miner == victim
    )));
}

/// Ticks the validator and returns the first offer it sends.
fn first_offer(w: &mut World) -> Offer {
    let fx = w.v.handle(ValidatorInput::Tick, w.now, &mut w.rng);
    fx.into_iter()
        .find_map(|e| match e {
            ValidatorEffect::SendOffer { offer, .. } => Some(offer),
            _ => None,
        })
        .unwrap()
}

/// Runs one job with `n` miners to the reveal, each revealing `artifacts[i]`.
fn reveal_all(w: &mut World, artifacts: &[&[u8]]) -> Vec<UploadHeader> {
    w.tick();
    let mut headers = vec![];
    for (i, art) in artifacts.iter().enumerate() {
        let now = w.now + 100 + i as u64; // miner 0 commits first
        let c = train(&mut w.miners[i].1, &job0(), art, now, &mut w.rng);
        let (receipt, _) = w.v.commit(c, now).unwrap();
        w.miners[i].1.handle(
            MinerInput::CommitAnswered {
                job_id: job0(),
                result: Ok(receipt),
            },
            now,
            &mut w.rng,
        );
        let fx = w.miners[i]
            .1
            .handle(MinerInput::Tick, w.now + BUDGET + 1, &mut w.rng);
        headers.extend(fx.into_iter().filter_map(|e| match e {
            MinerEffect::Upload { header, .. } => Some(header),
            _ => None,
        }));
    }
    w.now += BUDGET + 1;
    w.tick();
    for h in &headers {
        w.v.uploaded(h, w.now, &mut w.rng).unwrap();
    }
    headers
}

/// Hands the validator each revealed submission's evaluation: loss `loss(i)`, sketch `i`.
fn evaluate_all(w: &mut World, hs: &[UploadHeader], sketches: &[Vec<f32>], loss: fn(usize) -> f64) {
    for (i, h) in hs.iter().enumerate() {
        w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: h.miner.clone(),
                result: eval(loss(i), sketches[i].clone()),
            },
            w.now,
            &mut w.rng,
        );
    }
}

fn score_of<'a>(w: &'a World, miner: &PeerIdStr) -> &'a JobScore {
    w.v.job(&job0())
        .unwrap()
        .scores
        .iter()
        .find(|s| &s.miner == miner)
        .unwrap()
}

#[test]
fn exact_and_near_duplicates_fail_the_later_submission() {
    let mut w = World::new(4, 1);
    // Miners 0 and 1 reveal the same bytes; miner 2 a near copy of miner 3's delta; 3 is honest.
    let hs = reveal_all(&mut w, &[b"same", b"same", b"noisy", b"honest"]);
    let sketches = [
        vec![1.0, 0.0, 0.0, 0.0],
        vec![1.0, 0.0, 0.0, 0.0],
        vec![0.0, 1.0, 0.5, 0.001],
        vec![0.0, 1.0, 0.5, 0.0],
    ];
    evaluate_all(&mut w, &hs, &sketches, |i| 2.0 + i as f64 * 0.1);
    let first = score_of(&w, &hs[0].miner);
    assert!(first.penalty_reason.is_none(), "{first:?}");
    let copy = score_of(&w, &hs[1].miner);
    assert!(
        copy.penalty_reason
            .as_deref()
            .unwrap()
            .contains("same artifact"),
        "{copy:?}"
    );
    assert_eq!(copy.quality, 0.0);
    // Miner 2 committed before miner 3, so 3 is the later near copy; 2 is flagged, naming 3.
    let later = score_of(&w, &hs[3].miner);
    assert!(
        later
            .penalty_reason
            .as_deref()
            .unwrap()
            .contains("near copy"),
        "{later:?}"
    );
    let earlier = score_of(&w, &hs[2].miner);
    assert!(earlier.penalty_reason.is_none());
    let flag = earlier
        .verdicts
        .iter()
        .find(|v| v.check == "near_duplicate")
        .unwrap();
    assert_eq!(flag.outcome, Outcome::Flag);
    assert!(flag.reason.contains(&hs[3].miner.0));
}

#[test]
fn a_copy_of_two_earlier_submissions_is_failed_naming_both() {
    let mut w = World::new(4, 1);
    // Miner 2 resubmits miner 0's bytes; miner 1 committed a near copy of them in between.
    let hs = reveal_all(&mut w, &[b"orig", b"noisy", b"orig", b"honest"]);
    let sketches = [
        vec![1.0, 0.0, 0.0, 0.0],
        vec![1.0, 0.0, 0.0, 0.001],
        vec![1.0, 0.0, 0.0, 0.0],
        vec![0.0, 1.0, 0.5, 0.0],
    ];
    evaluate_all(&mut w, &hs, &sketches, |_| 2.0);
    // Every finding is kept, not only the first that failed it.
    let copy = score_of(&w, &hs[2].miner);
    let fails: Vec<&str> = copy
        .verdicts
        .iter()
        .filter(|v| v.outcome == Outcome::Fail)
        .map(|v| v.check.as_str())
        .collect();
    assert!(fails.contains(&"exact_duplicate"), "{copy:?}");
    assert!(fails.contains(&"near_duplicate"), "{copy:?}");
    let reason = copy.penalty_reason.as_deref().unwrap();
    assert!(
        reason.contains("exact_duplicate") && reason.contains("near_duplicate"),
        "{reason}"
    );
    assert!(score_of(&w, &hs[0].miner).penalty_reason.is_none());
}

#[test]
fn failed_integrity_checks_give_the_penalty_with_the_reason() {
    let mut w = World::new(2, 1);
    let hs = reveal_all(&mut w, &[b"nan", b"fine"]);
    let bad = Verdict {
        check: "finite".into(),
        outcome: Outcome::Fail,
        value: None,
        threshold: None,
        reason: "tensor `x` holds NaN".into(),
    };
    w.v.handle(
        ValidatorInput::Evaluated {
            job_id: job0(),
            miner: hs[0].miner.clone(),
            result: Ok(Evaluation {
                test_loss: None,
                synthetic_loss: None,
                verdicts: vec![bad],
                sketch: vec![],
                ..Default::default()
            }),
        },
        w.now,
        &mut w.rng,
    );
    w.v.handle(
        ValidatorInput::Evaluated {
            job_id: job0(),
            miner: hs[1].miner.clone(),
            result: eval(3.0, vec![1.0]),
        },
        w.now,
        &mut w.rng,
    );
    let s = score_of(&w, &hs[0].miner);
    assert!(
        s.penalty_reason.as_deref().unwrap().contains("NaN"),
        "{s:?}"
    );
    assert_eq!(s.verdicts[0].check, "finite");
    assert_eq!(score_of(&w, &hs[1].miner).quality, 1.0);
}

#[test]
fn a_copy_of_a_failed_submission_is_still_named_a_copy() {
    let mut w = World::new(3, 1);
    // Miner 0's artifact fails its own checks; miner 1 reveals the same bytes later.
    let hs = reveal_all(&mut w, &[b"same", b"same", b"honest"]);
    let bad = Verdict {
        check: "fine_tuned".into(),
        outcome: Outcome::Fail,
        value: None,
        threshold: None,
        reason: "the artifact equals the base model".into(),
    };
    w.v.handle(
        ValidatorInput::Evaluated {
            job_id: job0(),
            miner: hs[0].miner.clone(),
            result: Ok(Evaluation {
                test_loss: Some(2.0),
                verdicts: vec![bad],
                sketch: vec![1.0, 0.0],
                ..Default::default()
            }),
        },
        w.now,
        &mut w.rng,
    );
    for (i, sketch) in [(1, vec![1.0, 0.0]), (2, vec![0.0, 1.0])] {
        w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: hs[i].miner.clone(),
                result: eval(2.0, sketch),
            },
            w.now,
            &mut w.rng,
        );
    }
    let original = match &w.v.job(&job0()).unwrap().slots[&hs[0].miner].submission {
        SubmissionState::Failed { artifact, .. } => *artifact,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        original,
        Some(hs[0].artifact),
        "the failed artifact is kept"
    );
    let copy = score_of(&w, &hs[1].miner);
    let dup = copy
        .verdicts
        .iter()
        .find(|v| v.check == "exact_duplicate")
        .unwrap_or_else(|| panic!("{copy:?}"));
    assert_eq!(dup.outcome, Outcome::Fail);
    assert!(dup.reason.contains(&hs[0].miner.0), "{}", dup.reason);
    assert!(score_of(&w, &hs[2].miner).penalty_reason.is_none());
}

#[test]
fn runs_that_point_the_same_way_but_differ_in_size_are_not_near_duplicates() {
    let mut w = World::new(2, 1);
    let hs = reveal_all(&mut w, &[b"short run", b"longer run"]);
    // Same direction (the first gradient steps on one task), very different sizes.
    let sketches = [vec![1.0, 2.0, 0.5], vec![3.0, 6.0, 1.5]];
    for (i, h) in hs.iter().enumerate() {
        w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: h.miner.clone(),
                result: eval(3.0, sketches[i].clone()),
            },
            w.now,
            &mut w.rng,
        );
    }
    for h in &hs {
        let s = score_of(&w, &h.miner);
        assert!(s.penalty_reason.is_none() && s.verdicts.is_empty(), "{s:?}");
    }
}

#[test]
fn a_restarted_miner_resumes_training_before_the_deadline_only() {
    let mut w = World::new(1, 1);
    w.tick();
    let m = &w.miners[0].1;
    let job = m.job(&job0()).unwrap().clone();
    assert_eq!(job.phase, crate::MinerPhase::Training);
    let deadline = job.assignment.as_ref().unwrap().deadline_ms;
    // Restart before the deadline: training is handed out again.
    let mut again = MinerEngine::new(
        Identity::generate(),
        MinerPolicy::default(),
        vec![job.clone()],
    );
    let fx = again.resume(deadline - 1);
    assert!(
        fx.iter().any(|e| matches!(e, MinerEffect::Train { .. })),
        "{fx:?}"
    );
    // Restart after it: the job fails with the reason.
    let mut late = MinerEngine::new(Identity::generate(), MinerPolicy::default(), vec![job]);
    let fx = late.resume(deadline + 1);
    assert!(!fx.iter().any(|e| matches!(e, MinerEffect::Train { .. })));
    assert_eq!(late.job(&job0()).unwrap().phase, crate::MinerPhase::Failed);
    assert!(
        late.job(&job0())
            .unwrap()
            .detail
            .contains("deadline has passed")
    );
}

/// The effect's commitment or reveal header, if it sends one.
fn sent(fx: &[MinerEffect]) -> (Option<Commitment>, Option<UploadHeader>) {
    let c = fx.iter().find_map(|e| match e {
        MinerEffect::SendCommit { commitment, .. } => Some(commitment.clone()),
        _ => None,
    });
    let h = fx.iter().find_map(|e| match e {
        MinerEffect::Upload { header, .. } => Some(header.clone()),
        _ => None,
    });
    (c, h)
}

/// Found by the chaos run (`tunenet chaos`): a miner killed while its commitment or its
/// reveal was on the wire came back with the job stuck in that phase for ever (a job being
/// committed also held its only slot, so every later offer was refused as busy).
#[test]
fn a_miner_restarted_while_committing_or_revealing_sends_it_again() {
    let mut w = World::new(1, 1);
    w.tick();
    let id = w.ids[0].clone();
    let now = w.now + 10;
    let c = train(&mut w.miners[0].1, &job0(), b"art", now, &mut w.rng);
    let committing = w.miners[0].1.job(&job0()).unwrap().clone();
    assert_eq!(committing.phase, crate::MinerPhase::Committing);
    let deadline = committing.assignment.as_ref().unwrap().deadline_ms;
    let (first, _) = w.v.commit(c.clone(), now).unwrap();
    let restart =
        |j: &crate::MinerJob| MinerEngine::new(id.clone(), MinerPolicy::default(), vec![j.clone()]);

    // Before the deadline: the same commitment again; the validator, which had it, gives
    // the first receipt back, and the job is committed.
    let mut again = restart(&committing);
    let (resent, _) = sent(&again.resume(now + 50));
    let resent = resent.expect("the commitment is sent again");
    assert_eq!(resent.commit, c.commit);
    let (receipt, _) = w.v.commit(resent, now + 60).unwrap();
    assert_eq!(receipt.received_at_ms, first.received_at_ms);
    again.handle(
        MinerInput::CommitAnswered {
            job_id: job0(),
            result: Ok(receipt),
        },
        now + 70,
        &mut w.rng,
    );
    assert_eq!(
        again.job(&job0()).unwrap().phase,
        crate::MinerPhase::Committed
    );

    // After the deadline: too late to commit, so it reveals, and the validator takes it.
    let mut late = restart(&committing);
    let (none, header) = sent(&late.resume(deadline + 1));
    assert!(none.is_none());
    let header = header.expect("a reveal");
    assert_eq!(
        late.job(&job0()).unwrap().phase,
        crate::MinerPhase::Uploading
    );
    w.now = deadline + 1;
    w.tick();
    w.v.uploaded(&header, w.now, &mut w.rng).unwrap();

    // Killed while revealing, once the validator had the artifact: the reveal goes out
    // again, and the validator's "already uploaded" means the job is revealed.
    let uploading = late.job(&job0()).unwrap().clone();
    let mut third = restart(&uploading);
    let (_, again_header) = sent(&third.resume(deadline + 2));
    let refusal =
        w.v.uploaded(&again_header.expect("a reveal"), deadline + 2, &mut w.rng)
            .unwrap_err();
    assert!(
        refusal.to_string().contains(crate::miner::ALREADY_UPLOADED),
        "{refusal}"
    );
    third.handle(
        MinerInput::UploadAnswered {
            job_id: job0(),
            result: Err(refusal.to_string()),
        },
        deadline + 3,
        &mut w.rng,
    );
    let j = third.job(&job0()).unwrap();
    assert_eq!(j.phase, crate::MinerPhase::Uploaded, "{}", j.detail);
    assert_eq!(third.running(), 0);
}

fn eval_both(test: f64, synthetic: f64, verdicts: Vec<Verdict>) -> Result<Evaluation, String> {
    Ok(Evaluation {
        test_loss: Some(test),
        synthetic_loss: Some(synthetic),
        verdicts,
        sketch: vec![],
        ..Default::default()
    })
}

fn canary_verdict(p: f64) -> Verdict {
    Verdict {
        check: "canaries".into(),
        outcome: Outcome::Pass,
        value: Some(p),
        threshold: Some(0.05),
        reason: String::new(),
    }
}

fn leakage_of(w: &World, miner: &PeerIdStr) -> Verdict {
    score_of(w, miner)
        .verdicts
        .iter()
        .find(|v| v.check == LEAKAGE_CHECK)
        .cloned()
        .unwrap()
}

#[test]
fn synthetic_seed_is_drawn_only_after_the_deadline() {
    let mut w = World::new(2, 1);
    w.tick();
    assert_eq!(w.v.job(&job0()).unwrap().synthetic_seed, None);
    w.now += BUDGET / 2;
    w.tick();
    assert_eq!(w.v.job(&job0()).unwrap().synthetic_seed, None);
    w.now += BUDGET;
    w.tick();
    let seed = w.v.job(&job0()).unwrap().synthetic_seed;
    assert!(seed.is_some());
    w.now += 1;
    w.tick();
    assert_eq!(w.v.job(&job0()).unwrap().synthetic_seed, seed, "drawn once");
}

#[test]
fn a_test_loss_far_below_the_cohorts_for_its_synthetic_loss_fails_as_leakage() {
    let mut w = World::new(5, 1);
    let hs = reveal_all(&mut w, &[b"a", b"b", b"c", b"d", b"cheat"]);
    // Honest runs of different quality keep test and synthetic losses in step; the
    // cheater's test loss is 10 % below what its synthetic loss implies.
    let losses = [
        (2.0, 2.02),
        (2.2, 2.23),
        (2.5, 2.52),
        (1.9, 1.93),
        (1.8, 2.00),
    ];
    for (h, (t, s)) in hs.iter().zip(losses) {
        w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: h.miner.clone(),
                result: eval_both(t, s, vec![]),
            },
            w.now,
            &mut w.rng,
        );
    }
    let cheat = score_of(&w, &hs[4].miner);
    let reason = cheat.penalty_reason.as_deref().unwrap();
    assert!(
        reason.contains("test_leakage") && reason.contains("leaked"),
        "{reason}"
    );
    assert!(
        reason.contains("1.8000") && reason.contains("2.0000"),
        "{reason}"
    );
    assert_eq!(cheat.quality, 0.0);
    for h in &hs[..4] {
        let s = score_of(&w, &h.miner);
        assert!(s.penalty_reason.is_none(), "{s:?}");
        assert_eq!(leakage_of(&w, &h.miner).outcome, Outcome::Pass);
    }
    // The scored loss weighs test and synthetic equally by default.
    let first = score_of(&w, &hs[0].miner);
    assert!((first.loss.unwrap() - 2.01).abs() < 1e-9, "{first:?}");
}

#[test]
fn a_moderate_outlier_that_trained_on_its_canaries_is_only_flagged() {
    let mut w = World::new(4, 1);
    let hs = reveal_all(&mut w, &[b"a", b"b", b"c", b"d"]);
    // Spread floor: 1 % of a median ratio of 1.0; the outlier sits 7 spreads above.
    let losses = [(2.0, 2.0), (2.1, 2.1), (2.2, 2.2), (2.0, 2.14)];
    for (i, (h, (t, s))) in hs.iter().zip(losses).enumerate() {
        let verdicts = if i == 3 {
            vec![canary_verdict(0.01)]
        } else {
            vec![]
        };
        w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: h.miner.clone(),
                result: eval_both(t, s, verdicts),
            },
            w.now,
            &mut w.rng,
        );
    }
    let v = leakage_of(&w, &hs[3].miner);
    assert_eq!(v.outcome, Outcome::Flag, "{v:?}");
    assert!(v.value.unwrap() > 6.0 && v.value.unwrap() < 10.0, "{v:?}");
    assert!(score_of(&w, &hs[3].miner).penalty_reason.is_none());
}

#[test]
fn a_moderate_outlier_without_sign_of_training_on_its_data_fails() {
    let mut w = World::new(4, 1);
    let hs = reveal_all(&mut w, &[b"a", b"b", b"c", b"d"]);
    let losses = [(2.0, 2.0), (2.1, 2.1), (2.2, 2.2), (2.0, 2.14)];
    for (h, (t, s)) in hs.iter().zip(losses) {
        w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: h.miner.clone(),
                result: eval_both(t, s, vec![canary_verdict(0.4)]),
            },
            w.now,
            &mut w.rng,
        );
    }
    let s = score_of(&w, &hs[3].miner);
    assert!(
        s.penalty_reason
            .as_deref()
            .unwrap()
            .contains("no sign of training"),
        "{s:?}"
    );
}

#[test]
fn with_fewer_than_three_submissions_leakage_is_recorded_not_judged() {
    let mut w = World::new(2, 1);
    let hs = reveal_all(&mut w, &[b"a", b"b"]);
    for (h, (t, s)) in hs.iter().zip([(2.0, 2.0), (1.0, 3.0)]) {
        w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: h.miner.clone(),
                result: eval_both(t, s, vec![]),
            },
            w.now,
            &mut w.rng,
        );
    }
    for h in &hs {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Pass);
        assert!(v.reason.contains("not judged"), "{v:?}");
        assert!(score_of(&w, &h.miner).penalty_reason.is_none());
    }
}

/// Hands the validator `miner`'s evaluation with these per-record losses (and their means).
fn evaluated_per_record(
    w: &mut World,
    miner: &PeerIdStr,
    t: Vec<Option<f64>>,
    s: Vec<Option<f64>>,
) {
    evaluated_with_base(w, miner, t, s, None);
}

/// The same, the evaluation also carrying the base model's per-record losses.
fn evaluated_with_base(
    w: &mut World,
    miner: &PeerIdStr,
    t: Vec<Option<f64>>,
    s: Vec<Option<f64>>,
    base: Option<BaseRecords>,
) {
    let mean = |v: &[Option<f64>]| v.iter().flatten().sum::<f64>() / v.len() as f64;
    w.v.handle(
        ValidatorInput::Evaluated {
            job_id: job0(),
            miner: miner.clone(),
            result: Ok(Evaluation {
                test_loss: Some(mean(&t)),
                synthetic_loss: Some(mean(&s)),
                test_records: t,
                synthetic_records: s,
                base_records: base,
                ..Default::default()
            }),
        },
        w.now,
        &mut w.rng,
    );
}

#[test]
fn a_submission_far_better_on_the_test_records_than_on_synthetic_ones_fails_per_record() {
    let mut w = World::new(4, 1);
    let hs = reveal_all(&mut w, &[b"a", b"b", b"c", b"cheat"]);
    // 40 records a set whose difficulty varies; honest models of different strength scale
    // it alike on both sets, the cheater is 0.3 nats better on every test record.
    let difficulty = |i: usize| 2.0 + ((i * 37) % 17) as f64 / 10.0;
    let records = |scale: f64, jitter: f64, test_bonus: f64| {
        let t: Vec<Option<f64>> = (0..40)
            .map(|i| Some(scale * difficulty(i) + jitter * ((i * 7) % 5) as f64 - test_bonus))
            .collect();
        let s: Vec<Option<f64>> = (0..40)
            .map(|i| Some(scale * difficulty(i + 3) + jitter * ((i * 11) % 5) as f64))
            .collect();
        (t, s)
    };
    let models = [
        (1.0, 0.01, 0.0),
        (0.8, 0.02, 0.0),
        (0.6, 0.015, 0.0),
        (0.5, 0.01, 0.3),
    ];
    for (h, (scale, jitter, bonus)) in hs.iter().zip(models) {
        let (t, s) = records(scale, jitter, bonus);
        evaluated_per_record(&mut w, &h.miner, t, s);
    }
    let cheat = score_of(&w, &hs[3].miner);
    let reason = cheat.penalty_reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("test_leakage") && reason.contains("Mann–Whitney"),
        "{reason}"
    );
    for h in &hs[..3] {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
        assert!(v.value.unwrap() > 1e-3, "{v:?}");
    }
}

#[test]
fn a_leaky_peer_cannot_hide_a_weaker_leaker() {
    use rand::Rng;
    let mut w = World::new(6, 1);
    let hs = reveal_all(&mut w, &[b"a", b"b", b"c", b"d", b"strong", b"weak"]);
    // 40 records a set; each model scales the records' difficulty and has its own noise.
    // The strong leaker is 0.5 nats better on every test record, the weak one 0.08: a fit
    // that may lean on the strong leaker explains the weak one's test gain away.
    let difficulty = |i: usize| 2.0 + ((i * 37) % 17) as f64 / 10.0;
    let mut noise = StdRng::seed_from_u64(7);
    let models = [
        (1.0, 0.0),
        (0.8, 0.0),
        (0.6, 0.0),
        (0.7, 0.0),
        (0.55, 0.5),
        (0.65, 0.08),
    ];
    for (h, (scale, bonus)) in hs.iter().zip(models) {
        let mut record = |i: usize, bonus: f64| {
            Some(scale * difficulty(i) + noise.random_range(-0.05..0.05) - bonus)
        };
        let t: Vec<Option<f64>> = (0..40).map(|i| record(i, bonus)).collect();
        let s: Vec<Option<f64>> = (0..40).map(|i| record(i + 3, 0.0)).collect();
        evaluated_per_record(&mut w, &h.miner, t, s);
    }
    for cheat in &hs[4..] {
        let v = leakage_of(&w, &cheat.miner);
        assert_eq!(v.outcome, Outcome::Fail, "{v:?}");
    }
    let weak = leakage_of(&w, &hs[5].miner);
    assert!(
        !weak.reason.contains(&hs[4].miner.to_string()),
        "the strong leaker served as a reference: {}",
        weak.reason
    );
    for h in &hs[..4] {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
    }
}

/// Two leakers that memorised the same test records, four honest models and the base
/// model's own losses, `with_base` deciding whether the validator measured those.
fn mutual_leakers(with_base: bool) -> (World, Vec<UploadHeader>) {
    use rand::Rng;
    let mut w = World::new(6, 1);
    let hs = reveal_all(&mut w, &[b"a", b"b", b"c", b"d", b"leak1", b"leak2"]);
    // 60 test and 180 synthetic records of random difficulty. Each leaker gains on test
    // record i what that record's memorisation is worth, the same records for both (they
    // trained on the same split), plus its own noise.
    let mut rng = StdRng::seed_from_u64(21);
    let dt: Vec<f64> = (0..60).map(|_| rng.random_range(1.5..3.5)).collect();
    let ds: Vec<f64> = (0..180).map(|_| rng.random_range(1.5..3.5)).collect();
    let memorised: Vec<f64> = (0..60).map(|_| rng.random_range(0.0..0.25)).collect();
    let base = BaseRecords {
        test: dt
            .iter()
            .map(|d| Some(1.15 * d + rng.random_range(-0.04..0.04)))
            .collect(),
        synthetic: ds
            .iter()
            .map(|d| Some(1.15 * d + rng.random_range(-0.04..0.04)))
            .collect(),
        control: vec![],
    };
    let models = [
        (1.0, 0.0),
        (0.95, 0.0),
        (0.9, 0.0),
        (0.97, 0.0),
        (0.95, 1.0),
        (0.95, 1.0),
    ];
    for (k, (h, (scale, leak))) in hs.iter().zip(models).enumerate() {
        let t: Vec<Option<f64>> = dt
            .iter()
            .zip(&memorised)
            .map(|(d, m)| Some(scale * d - leak * m + rng.random_range(-0.02..0.02)))
            .collect();
        let s: Vec<Option<f64>> = ds
            .iter()
            .map(|d| Some(scale * d + rng.random_range(-0.02..0.02)))
            .collect();
        // Every evaluation carries them; the job keeps the first.
        let base = (with_base && k % 2 == 0).then(|| base.clone());
        evaluated_with_base(&mut w, &h.miner, t, s, base);
    }
    (w, hs)
}

#[test]
fn leakers_that_memorised_the_same_records_cannot_hide_each_other() {
    // Without the base model's losses, each leaker is the other's best reference: the fit
    // explains one's low test losses by the other's, and neither stands out.
    let (w, hs) = mutual_leakers(false);
    let masked: Vec<Verdict> = hs[4..].iter().map(|h| leakage_of(&w, &h.miner)).collect();
    assert!(
        masked.iter().any(|v| v.outcome == Outcome::Pass),
        "no masking to defeat: {masked:?}"
    );
    // Against the base alone each one beats it by more on the test records: both are set
    // aside as references, and judged against the honest models both fail.
    let (w, hs) = mutual_leakers(true);
    assert!(w.v.job(&job0()).unwrap().base_records.is_some());
    for h in &hs[4..] {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Fail, "{v:?}");
        assert!(v.reason.contains("set aside as reference"), "{v:?}");
        for other in &hs[4..] {
            assert!(!v.reason.contains(&other.miner.to_string()), "{v:?}");
        }
    }
    for h in &hs[..4] {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
    }
}

#[test]
fn a_submission_left_without_references_is_judged_against_the_base_model() {
    use rand::Rng;
    // Two submissions, one a leaker the screen sets aside: the honest one has no other
    // reference and is judged against the base alone; the leaker against the honest one.
    let mut w = World::new(2, 1);
    let hs = reveal_all(&mut w, &[b"honest", b"leak"]);
    let mut rng = StdRng::seed_from_u64(5);
    let dt: Vec<f64> = (0..60).map(|_| rng.random_range(1.5..3.5)).collect();
    let ds: Vec<f64> = (0..120).map(|_| rng.random_range(1.5..3.5)).collect();
    let base = BaseRecords {
        test: dt.iter().map(|d| Some(1.1 * d)).collect(),
        synthetic: ds.iter().map(|d| Some(1.1 * d)).collect(),
        control: vec![],
    };
    for (h, leak) in hs.iter().zip([0.0, 0.3]) {
        let t: Vec<Option<f64>> = dt
            .iter()
            .map(|d| Some(d - leak + rng.random_range(-0.03..0.03)))
            .collect();
        let s: Vec<Option<f64>> = ds
            .iter()
            .map(|d| Some(d + rng.random_range(-0.03..0.03)))
            .collect();
        evaluated_with_base(&mut w, &h.miner, t, s, Some(base.clone()));
    }
    let honest = leakage_of(&w, &hs[0].miner);
    assert_eq!(honest.outcome, Outcome::Pass, "{honest:?}");
    assert!(honest.reason.contains("the base model"), "{honest:?}");
    let leak = leakage_of(&w, &hs[1].miner);
    assert_eq!(leak.outcome, Outcome::Fail, "{leak:?}");
}

/// Per-record losses of honest models on a rewritten synthetic set: training moves a
/// model's loss on the real test records by `gain`, on the model-written records by half
/// that (they are not the data's style), plus per-record noise; `bonus` is a leak.
fn rewritten_world(gains: &[(f64, f64)], alike: bool, fails: bool) -> (World, Vec<UploadHeader>) {
    use rand::Rng;
    let mut w = World::new(gains.len(), 1);
    w.v.set_integrity(IntegritySettings {
        synthetic_alike: alike,
        leak_rewritten_fails: fails,
        ..Default::default()
    });
    let names: Vec<Vec<u8>> = (0..gains.len()).map(|i| vec![b'm', i as u8]).collect();
    let refs: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
    let hs = reveal_all(&mut w, &refs);
    let difficulty = |i: usize| 2.0 + ((i * 37) % 17) as f64 / 10.0;
    let mut noise = StdRng::seed_from_u64(11);
    for (h, (gain, bonus)) in hs.iter().zip(gains) {
        let t: Vec<Option<f64>> = (0..40)
            .map(|i| Some(difficulty(i) - gain - bonus + noise.random_range(-0.03..0.03)))
            .collect();
        let s: Vec<Option<f64>> = (0..40)
            .map(|i| Some(difficulty(i + 3) - gain / 2.0 + noise.random_range(-0.03..0.03)))
            .collect();
        evaluated_per_record(&mut w, &h.miner, t, s);
    }
    (w, hs)
}

#[test]
fn on_a_rewritten_synthetic_set_only_a_submission_that_stands_out_fails() {
    // Honest runs of growing strength, and one that also trained on the test split.
    let gains = [(0.1, 0.0), (0.2, 0.0), (0.3, 0.0), (0.45, 0.0), (0.25, 0.4)];
    // Judged as if the set were drawn alike, the strongest honest run looks leaky...
    let (w, hs) = rewritten_world(&gains, true, true);
    assert_eq!(leakage_of(&w, &hs[3].miner).outcome, Outcome::Fail);
    // ...against the cohort's shifts it does not, and the leaker still fails.
    let (w, hs) = rewritten_world(&gains, false, true);
    for h in &hs[..4] {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
        assert!(v.reason.contains("spreads below"), "{v:?}");
    }
    let v = leakage_of(&w, &hs[4].miner);
    assert_eq!(v.outcome, Outcome::Fail, "{v:?}");
    assert!(
        v.reason.contains("rewritten") && v.reason.contains("spreads below"),
        "{v:?}"
    );
    // Unless the operator turned failing on, a finding on a rewritten set is a flag.
    let (w, hs) = rewritten_world(&gains, false, false);
    let v = leakage_of(&w, &hs[4].miner);
    assert_eq!(v.outcome, Outcome::Flag, "{v:?}");
    assert!(v.reason.contains("leak_rewritten_fails"), "{v:?}");
    assert!(score_of(&w, &hs[4].miner).penalty_reason.is_none());
    // With fewer than three others to compare with, nothing is judged.
    let (w, hs) = rewritten_world(&[(0.1, 0.0), (0.2, 0.0), (0.45, 0.4)], false, true);
    for h in &hs {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
        assert!(
            v.reason.contains("not judged") && v.reason.contains("rewritten"),
            "{v:?}"
        );
    }
}

/// `n` miners revealed in a job judged as on real data (synthetic set not drawn alike,
/// leak findings failing), paired with neighbours or not; miner names start with `tag`.
fn judged_on_real_data(n: usize, paired: bool, tag: u8) -> (World, Vec<UploadHeader>) {
    let mut w = World::new(n, 1);
    w.v.set_integrity(IntegritySettings {
        synthetic_alike: false,
        synthetic_paired: paired,
        leak_rewritten_fails: true,
        ..Default::default()
    });
    let names: Vec<Vec<u8>> = (0..n).map(|i| vec![tag, i as u8]).collect();
    let refs: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
    let hs = reveal_all(&mut w, &refs);
    (w, hs)
}

/// Per-record losses on a set of the test records' neighbours: each model has its own
/// per-record quirks (sd about 0.3 nats) that its test record and that record's neighbour
/// share, the neighbour costs a little more (its replaced words), the more so the
/// stronger the model; `leak` is a memorised test split's extra gain on the test records.
fn neighbour_world(leaks: &[f64], paired: bool) -> (World, Vec<UploadHeader>) {
    use rand::Rng;
    let (mut w, hs) = judged_on_real_data(leaks.len(), paired, b'n');
    let difficulty = |i: usize| 2.0 + ((i * 37) % 17) as f64 / 10.0;
    let mut noise = StdRng::seed_from_u64(13);
    for (m, (h, leak)) in hs.iter().zip(leaks).enumerate() {
        let gain = 0.1 + 0.05 * m as f64;
        let (mut t, mut s) = (Vec::new(), Vec::new());
        for i in 0..40 {
            let quirk = noise.random_range(-0.5..0.5);
            t.push(Some(
                difficulty(i) - gain + quirk - leak + noise.random_range(-0.02..0.02),
            ));
            s.push(Some(
                difficulty(i) + 0.2 * (1.0 + gain) - gain + quirk + noise.random_range(-0.02..0.02),
            ));
        }
        evaluated_per_record(&mut w, &h.miner, t, s);
    }
    (w, hs)
}

#[test]
fn neighbours_pair_each_test_record_with_its_own_and_catch_a_leak_the_unpaired_test_misses() {
    let leaks = [0.0, 0.0, 0.0, 0.0, 0.0, 0.15];
    let (w, hs) = neighbour_world(&leaks, true);
    let v = leakage_of(&w, &hs[5].miner);
    assert_eq!(v.outcome, Outcome::Fail, "{v:?}");
    assert!(
        v.reason.contains("Wilcoxon") && v.reason.contains("neighbour"),
        "{v:?}"
    );
    for h in &hs[..5] {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
    }
    // The same losses judged as two unrelated sets: the records' quirks swamp the leak.
    let (w, hs) = neighbour_world(&leaks, false);
    let v = leakage_of(&w, &hs[5].miner);
    assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
    assert!(v.reason.contains("Mann–Whitney"), "{v:?}");
}

/// A job whose submissions were also scored on held-out control records (drawn as the
/// test split was): each honest model has its own strength and per-record quirks; a
/// leaker memorised the test records (`leak` nats on each), and its neighbours keep most
/// of their record's words, so they get `carry` of that gain too. Without a synthetic
/// set (`neighbours` false) only the control records are there to compare with;
/// `control` false leaves them out.
fn control_world(
    leaks: &[(f64, f64)],
    neighbours: bool,
    control: bool,
) -> (World, Vec<UploadHeader>) {
    use rand::Rng;
    let (mut w, hs) = judged_on_real_data(leaks.len(), true, b'k');
    let difficulty = |i: usize| 2.0 + ((i * 37) % 17) as f64 / 10.0;
    let mut noise = StdRng::seed_from_u64(17);
    for (m, (h, (leak, carry))) in hs.iter().zip(leaks).enumerate() {
        let gain = 0.1 + 0.05 * m as f64;
        let (mut t, mut s, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..40 {
            let quirk = noise.random_range(-0.1..0.1);
            t.push(Some(difficulty(i) - gain + quirk - leak));
            s.push(Some(
                difficulty(i) + 0.2 * (1.0 + gain) - gain + quirk - leak * carry
                    + noise.random_range(-0.1..0.1),
            ));
        }
        for i in 0..24 {
            c.push(Some(
                difficulty(i + 5) - gain + noise.random_range(-0.1..0.1),
            ));
        }
        let mean = |v: &[Option<f64>]| v.iter().flatten().sum::<f64>() / v.len() as f64;
        w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: h.miner.clone(),
                result: Ok(Evaluation {
                    test_loss: Some(mean(&t)),
                    synthetic_loss: neighbours.then(|| mean(&s)),
                    test_records: t,
                    synthetic_records: if neighbours { s } else { vec![] },
                    control_records: if control { c } else { vec![] },
                    ..Default::default()
                }),
            },
            w.now,
            &mut w.rng,
        );
    }
    (w, hs)
}

#[test]
fn held_out_control_records_catch_a_test_split_leak_that_its_neighbours_share() {
    // Five honest models and one that memorised the test split: its neighbours keep most
    // of each record's words, so they share 85 % of its gain and the paired test alone
    // cannot tell it from its peers.
    let leaks = [
        (0.0, 0.0),
        (0.0, 0.0),
        (0.0, 0.0),
        (0.0, 0.0),
        (0.0, 0.0),
        (0.3, 0.85),
    ];
    let (w, hs) = control_world(&leaks, true, true);
    let v = leakage_of(&w, &hs[5].miner);
    assert_eq!(v.outcome, Outcome::Fail, "{v:?}");
    assert!(
        v.reason.contains("held-out records of the same dataset")
            && v.reason.contains("Mann–Whitney"),
        "{v:?}"
    );
    assert!(
        v.value.unwrap() <= IntegritySettings::default().control_alpha,
        "{v:?}"
    );
    for h in &hs[..5] {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
        assert!(v.reason.contains("against held-out records"), "{v:?}");
    }
    // Without the control records, the neighbours alone let it through.
    let (w, hs) = control_world(&leaks, true, false);
    let v = leakage_of(&w, &hs[5].miner);
    assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
    // With no synthetic set at all (synthetic_generator = "none"), the control records
    // still judge every submission.
    let (w, hs) = control_world(&leaks, false, true);
    assert_eq!(leakage_of(&w, &hs[5].miner).outcome, Outcome::Fail);
    for h in &hs[..5] {
        assert_eq!(leakage_of(&w, &h.miner).outcome, Outcome::Pass);
    }
}

/// Real data with held-out control records and no synthetic set: two models that trained
/// on the test split alone (the same records memorised, each with its own noise) beside
/// four honest ones, the base model's losses on test and control records measured or not.
fn mutual_control_leakers(with_base: bool) -> (World, Vec<UploadHeader>) {
    use rand::Rng;
    let (mut w, hs) = judged_on_real_data(6, false, b'm');
    let mut rng = StdRng::seed_from_u64(23);
    let dt: Vec<f64> = (0..60).map(|_| rng.random_range(1.5..3.5)).collect();
    let dc: Vec<f64> = (0..60).map(|_| rng.random_range(1.5..3.5)).collect();
    let memorised: Vec<f64> = (0..60).map(|_| rng.random_range(0.0..0.25)).collect();
    let base = BaseRecords {
        test: dt.iter().map(|d| Some(1.15 * d)).collect(),
        synthetic: vec![],
        control: dc.iter().map(|d| Some(1.15 * d)).collect(),
    };
    let models = [
        (1.0, 0.0),
        (0.95, 0.0),
        (0.9, 0.0),
        (0.97, 0.0),
        (0.95, 1.0),
        (0.95, 1.0),
    ];
    for (h, (scale, leak)) in hs.iter().zip(models) {
        let t: Vec<Option<f64>> = dt
            .iter()
            .zip(&memorised)
            .map(|(d, m)| Some(scale * d - leak * m + rng.random_range(-0.02..0.02)))
            .collect();
        let c: Vec<Option<f64>> = dc
            .iter()
            .map(|d| Some(scale * d + rng.random_range(-0.02..0.02)))
            .collect();
        let mean = |v: &[Option<f64>]| v.iter().flatten().sum::<f64>() / v.len() as f64;
        w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: h.miner.clone(),
                result: Ok(Evaluation {
                    test_loss: Some(mean(&t)),
                    test_records: t,
                    control_records: c,
                    base_records: with_base.then(|| base.clone()),
                    ..Default::default()
                }),
            },
            w.now,
            &mut w.rng,
        );
    }
    (w, hs)
}

#[test]
fn leakers_that_memorised_the_test_split_cannot_hide_each_other_against_control_records() {
    // Without the base model's losses, each is the other's best reference.
    let (w, hs) = mutual_control_leakers(false);
    let masked: Vec<Verdict> = hs[4..].iter().map(|h| leakage_of(&w, &h.miner)).collect();
    assert!(
        masked.iter().any(|v| v.outcome == Outcome::Pass),
        "no masking to defeat: {masked:?}"
    );
    // Control records are drawn as the test split was on any data, so the screen against
    // the base sets both aside, and judged against the honest models both fail.
    let (w, hs) = mutual_control_leakers(true);
    for h in &hs[4..] {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Fail, "{v:?}");
        assert!(
            v.reason.contains("held-out records of the same dataset")
                && v.reason.contains("set aside as reference"),
            "{v:?}"
        );
        assert_eq!(
            v.threshold,
            Some(IntegritySettings::default().control_alpha)
        );
        for other in &hs[4..] {
            assert!(!v.reason.contains(&other.miner.to_string()), "{v:?}");
        }
    }
    for h in &hs[..4] {
        let v = leakage_of(&w, &h.miner);
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
    }
}

/// Commits `artifact` for miner `i` at `at` and returns its upload header (taken once the
/// miner sees the deadline pass).
fn commit_and_header(w: &mut World, i: usize, artifact: &[u8], at: UnixMillis) -> UploadHeader {
    let c = train(&mut w.miners[i].1, &job0(), artifact, at, &mut w.rng);
    let (receipt, _) = w.v.commit(c, at).unwrap();
    w.miners[i].1.handle(
        MinerInput::CommitAnswered {
            job_id: job0(),
            result: Ok(receipt),
        },
        at,
        &mut w.rng,
    );
    let fx = w.miners[i]
        .1
        .handle(MinerInput::Tick, w.now + BUDGET + 1, &mut w.rng);
    fx.into_iter()
        .find_map(|e| match e {
            MinerEffect::Upload { header, .. } => Some(header),
            _ => None,
        })
        .unwrap()
}

#[test]
fn a_resent_commitment_keeps_its_first_receipt() {
    let mut w = World::new(2, 1);
    w.tick();
    let first = w.now + 10;
    let c = train(&mut w.miners[0].1, &job0(), b"honest", first, &mut w.rng);
    let (r1, _) = w.v.commit(c.clone(), first).unwrap();
    // Anyone who saw the signed commitment re-sends it later: the first receipt stands.
    let (r2, fx) = w.v.commit(c.clone(), first + 500).unwrap();
    assert_eq!(r1, r2);
    assert!(
        fx.is_empty(),
        "a re-sent commitment changes nothing: {fx:?}"
    );
    let slot = &w.v.job(&job0()).unwrap().slots[&c.miner];
    assert_eq!(slot.receipt.as_ref().unwrap().received_at_ms, first);
    // A new commitment by the miner itself replaces it; re-sending the old one then gets
    // the old receipt back and leaves the new one current.
    let mut c2 = c.clone();
    c2.commit = BlobId::of(b"another commitment");
    c2.signature = w.ids[0].sign(&c2.signing_bytes());
    let (r3, _) = w.v.commit(c2.clone(), first + 600).unwrap();
    let (again, _) = w.v.commit(c, first + 700).unwrap();
    assert_eq!(again, r1);
    let slot = &w.v.job(&job0()).unwrap().slots[&c2.miner];
    assert_eq!(slot.commitment.as_ref().unwrap().commit, c2.commit);
    assert_eq!(slot.receipt.as_ref(), Some(&r3));
}

#[test]
fn an_offer_that_cannot_be_delivered_is_retried_within_the_window() {
    let mut w = World::new(1, 1);
    let fx = w.v.handle(ValidatorInput::Tick, w.now, &mut w.rng);
    let addr = fx
        .iter()
        .find_map(|e| match e {
            ValidatorEffect::SendOffer { addr, .. } => Some(addr.clone()),
            _ => None,
        })
        .unwrap();
    // The miner is not listening yet.
    w.v.handle(
        ValidatorInput::Decision {
            job_id: job0(),
            addr: addr.clone(),
            reply: Err("connection refused".into()),
        },
        w.now,
        &mut w.rng,
    );
    assert!(matches!(
        w.v.job(&job0()).unwrap().offers[&addr],
        OfferState::Retrying { attempts: 1, .. }
    ));
    assert!(matches!(
        w.v.job(&job0()).unwrap().phase,
        JobPhase::Offering { .. }
    ));
    // Later it listens: the offer goes out again and the job is assigned.
    w.now += 600;
    w.tick();
    let job = w.v.job(&job0()).unwrap();
    assert!(
        matches!(job.phase, JobPhase::Running { .. }),
        "{:?}",
        job.phase
    );
    assert_eq!(job.slots.len(), 1);
}

#[test]
fn a_reveal_before_the_next_tick_is_evaluated_with_the_synthetic_seed_drawn() {
    let mut w = World::new(1, 1);
    w.v.plan.requires_synthetic = true;
    w.tick();
    let at = w.now + 10;
    let h = commit_and_header(&mut w, 0, b"x", at);
    // No tick between the deadline and the reveal.
    w.now += BUDGET + 1;
    let fx = w.v.uploaded(&h, w.now, &mut w.rng).unwrap();
    assert!(
        fx.iter()
            .any(|e| matches!(e, ValidatorEffect::Evaluate { .. }))
    );
    let job = w.v.job(&job0()).unwrap();
    assert!(
        job.synthetic_seed.is_some(),
        "seed drawn before the evaluation"
    );
    assert!(matches!(job.phase, JobPhase::Revealing { .. }));
}

#[test]
fn a_job_whose_evaluations_lack_the_synthetic_set_is_not_scored() {
    let mut w = World::new(1, 1);
    w.v.plan.requires_synthetic = true;
    w.tick();
    let at = w.now + 10;
    let h = commit_and_header(&mut w, 0, b"x", at);
    w.now += BUDGET + 1;
    w.v.uploaded(&h, w.now, &mut w.rng).unwrap();
    w.v.handle(
        ValidatorInput::Evaluated {
            job_id: job0(),
            miner: h.miner.clone(),
            result: eval(2.0, vec![1.0]),
        },
        w.now,
        &mut w.rng,
    );
    let job = w.v.job(&job0()).unwrap();
    match &job.phase {
        JobPhase::Done { note: Some(n) } => assert!(n.contains("synthetic"), "{n}"),
        other => panic!("{other:?}"),
    }
    assert!(job.scores.is_empty());
}

/// The verdict the artifact check gives every LoRA adapter.
fn lora_verdict(rank: f64) -> Verdict {
    Verdict {
        check: "lora_rank".into(),
        outcome: Outcome::Pass,
        value: Some(rank),
        threshold: Some(16.0),
        reason: "within bounds".into(),
    }
}

fn exposure_verdict(p: f64) -> Verdict {
    Verdict {
        check: "canary_exposure".into(),
        outcome: Outcome::Pass,
        value: Some(p),
        threshold: Some(0.05),
        reason: String::new(),
    }
}

/// Evaluates each of `ps` (one exposure p-value per miner, same losses) and returns the
/// world and the uploads.
fn with_exposure(ps: &[f64]) -> (World, Vec<UploadHeader>) {
    let cases: Vec<(f64, f64)> = ps.iter().map(|p| (*p, 2.0)).collect();
    with_exposure_and_loss(&cases)
}

/// As [`with_exposure`], with each miner's synthetic loss.
fn with_exposure_and_loss(cases: &[(f64, f64)]) -> (World, Vec<UploadHeader>) {
    let cases: Vec<(f64, f64, Option<f64>)> = cases.iter().map(|(p, l)| (*p, *l, None)).collect();
    with_exposure_loss_and_rank(&cases)
}

/// As [`with_exposure_and_loss`], each miner also a LoRA adapter of the given rank (None: a
/// full fine-tune).
fn with_exposure_loss_and_rank(cases: &[(f64, f64, Option<f64>)]) -> (World, Vec<UploadHeader>) {
    let mut w = World::new(cases.len(), 1);
    let artifacts: Vec<Vec<u8>> = (0..cases.len()).map(|i| vec![b'a' + i as u8]).collect();
    let refs: Vec<&[u8]> = artifacts.iter().map(Vec::as_slice).collect();
    let hs = reveal_all(&mut w, &refs);
    for (h, (p, loss, rank)) in hs.iter().zip(cases) {
        let mut verdicts = vec![exposure_verdict(*p)];
        verdicts.extend(rank.map(lora_verdict));
        w.v.handle(
            ValidatorInput::Evaluated {
                job_id: job0(),
                miner: h.miner.clone(),
                result: eval_both(2.0, *loss, verdicts),
            },
            w.now,
            &mut w.rng,
        );
    }
    (w, hs)
}

#[test]
fn no_sign_of_training_on_its_canaries_fails_once_the_job_shows_them_learnable() {
    let (w, hs) = with_exposure(&[1e-4, 2e-3, 0.3]);
    for (i, h) in hs.iter().enumerate() {
        let s = score_of(&w, &h.miner);
        let untrained = s.verdicts.iter().find(|v| v.check == UNTRAINED_CHECK);
        if i == 2 {
            let v = untrained.unwrap();
            assert_eq!(v.outcome, Outcome::Fail);
            assert!(v.reason.contains("p = 0.30"), "{}", v.reason);
            assert!(v.reason.contains("1 other submission"), "{}", v.reason);
            assert!(s.penalty_reason.is_some(), "{s:?}");
        } else {
            // p = 2e-3 is weaker than the decisive level but still shows training.
            assert!(untrained.is_none(), "{s:?}");
            assert!(s.penalty_reason.is_none(), "{s:?}");
        }
    }
}

#[test]
fn a_lora_adapter_is_judged_for_its_canaries_only_by_lora_peers() {
    // (exposure p, synthetic loss, LoRA rank or a full fine-tune).
    let cases: [(f64, f64, Option<f64>); 4] = [
        // A full fine-tune that learned less on fresh records and memorised its canaries.
        (1e-4, 2.4, None),
        // An honest rank-4 adapter that learned more but memorised less.
        (0.07, 2.0, Some(4.0)),
        // A full fine-tune that never saw its canaries: judged by every peer.
        (0.5, 2.1, None),
        // An adapter that learned the least, its canaries showing.
        (5e-4, 2.5, Some(8.0)),
    ];
    let (w, hs) = with_exposure_loss_and_rank(&cases);
    let untrained = |i: usize| {
        score_of(&w, &hs[i].miner)
            .verdicts
            .iter()
            .find(|v| v.check == UNTRAINED_CHECK)
            .cloned()
    };
    // The rank-4 adapter is judged by LoRA peers only: the rank-8 one learned no more and
    // showed its canaries, so it fails; the full fine-tune is not counted.
    let v = untrained(1).expect("judged by the rank-8 adapter");
    assert_eq!(v.outcome, Outcome::Fail, "{v:?}");
    assert!(v.reason.contains("1 other LoRA submission"), "{v:?}");
    assert!(v.reason.contains("loss up to 2.5000"), "{v:?}");
    // The full fine-tune that never saw its canaries is judged by every peer.
    let v = untrained(2).expect("judged");
    assert!(v.reason.contains("2 other submissions"), "{v:?}");
    // With only the full fine-tune decisive, the adapter is not judged.
    let (w, hs) = with_exposure_loss_and_rank(&[(1e-4, 2.4, None), (0.07, 2.0, Some(4.0))]);
    let s = score_of(&w, &hs[1].miner);
    assert!(
        s.verdicts.iter().all(|v| v.check != UNTRAINED_CHECK),
        "{s:?}"
    );
    assert!(s.penalty_reason.is_none(), "{s:?}");
}

#[test]
fn without_a_decisive_submission_in_the_job_nobody_fails_for_canaries() {
    // Short runs on a model that memorises little: nobody's canaries show, so the test
    // says nothing about anyone.
    let (w, hs) = with_exposure(&[0.02, 0.3, 0.7]);
    for h in &hs {
        let s = score_of(&w, &h.miner);
        assert!(
            s.verdicts.iter().all(|v| v.check != UNTRAINED_CHECK),
            "{s:?}"
        );
        assert!(s.penalty_reason.is_none(), "{s:?}");
    }
    // The only decisive one does not make itself a reference.
    let (w, hs) = with_exposure(&[1e-4, 0.5]);
    assert!(score_of(&w, &hs[0].miner).penalty_reason.is_none());
    assert!(score_of(&w, &hs[1].miner).penalty_reason.is_some());
}

#[test]
fn only_peers_that_learned_no_more_on_fresh_records_make_the_test_decisive() {
    // A strong run memorises its canaries and learns the task well (synthetic loss 1.5);
    // a weak honest run learns less (2.2) and shows nothing: not judged by the strong one.
    // A run on other data learns the task better than the weak one (1.9) and never saw its
    // canaries: the run at 2.0, which learned no more and memorised its canaries, judges it.
    let (w, hs) = with_exposure_and_loss(&[(1e-4, 1.5), (0.3, 2.2), (0.6, 1.9), (5e-4, 2.0)]);
    assert!(score_of(&w, &hs[0].miner).penalty_reason.is_none());
    assert!(score_of(&w, &hs[1].miner).penalty_reason.is_none());
    assert!(score_of(&w, &hs[3].miner).penalty_reason.is_none());
    let s = score_of(&w, &hs[2].miner);
    let v = s
        .verdicts
        .iter()
        .find(|v| v.check == UNTRAINED_CHECK)
        .unwrap();
    assert!(v.reason.contains("1 other submission"), "{}", v.reason);
    assert!(
        v.reason.contains("2.0000 against its 1.9000"),
        "{}",
        v.reason
    );
}

/// A miner whose clock is 30 s ahead of or behind the validator's keeps the validator's
/// deadline: it trains for the whole budget, commits in time and reveals once the deadline
/// has passed on the validator's clock. Without the correction the clock ahead reveals
/// half a minute early (refused) and the clock behind commits half a minute late (refused),
/// as the last two assertions show. A reveal refused as early waits a second and goes again.
#[test]
fn clocks_thirty_seconds_apart_keep_the_validators_deadline() {
    for skew in [-30_000i64, 30_000] {
        let mut w = World::new(1, 1);
        // The miner's clock when the validator's reads `v`.
        let at = |v: UnixMillis| v.saturating_add_signed(skew);
        let mut pending = w.v.handle(ValidatorInput::Tick, w.now, &mut w.rng);
        let mut assignment = None;
        while let Some(e) = pending.pop() {
            match e {
                ValidatorEffect::SendOffer { addr, offer } => {
                    let m = &mut w.miners[0].1;
                    let (d, _) = m.offer(offer.clone(), at(w.now), None);
                    let reply = Ok(m.reply(offer.job_id.clone(), &offer.validator, d));
                    let job_id = offer.job_id;
                    pending.extend(w.v.handle(
                        ValidatorInput::Decision {
                            job_id,
                            addr,
                            reply,
                        },
                        w.now,
                        &mut w.rng,
                    ));
                }
                ValidatorEffect::SendAssignment { assignment: a, .. } => assignment = Some(a),
                _ => {}
            }
        }
        let a = assignment.expect("an assignment");
        let deadline = a.deadline_ms;
        // The assignment takes 20 ms to arrive.
        let fx = w.miners[0].1.assign(a, at(w.now + 20)).unwrap();
        let local = fx
            .iter()
            .find_map(|e| match e {
                MinerEffect::Train { deadline_ms, .. } => Some(*deadline_ms),
                _ => None,
            })
            .expect("training");
        assert_eq!(local, at(deadline + 20), "skew {skew}");
        assert_eq!(local - at(w.now + 20), BUDGET, "the whole budget to train");

        // Trained up to 3 s before its deadline: the commitment is in time.
        let c = train(
            &mut w.miners[0].1,
            &job0(),
            b"art",
            local - 3000,
            &mut w.rng,
        );
        let (receipt, _) = w.v.commit(c, deadline - 2970).unwrap();
        w.miners[0].1.handle(
            MinerInput::CommitAnswered {
                job_id: job0(),
                result: Ok(receipt),
            },
            local - 2960,
            &mut w.rng,
        );
        // No reveal until the deadline has passed on the validator's clock.
        let (_, early) = sent(&w.miners[0].1.handle(MinerInput::Tick, local, &mut w.rng));
        assert!(early.is_none(), "skew {skew}: revealed at the deadline");
        let (_, header) = sent(
            &w.miners[0]
                .1
                .handle(MinerInput::Tick, local + 1, &mut w.rng),
        );
        let header = header.expect("a reveal after the deadline");

        // A reveal refused as early (the validator's clock stepped back): again a second
        // later. (Uncorrected, the clock 30 s ahead would have revealed 30 s early and met
        // this refusal with no retry.)
        let refusal =
            w.v.uploaded(&header, deadline - 500, &mut w.rng)
                .unwrap_err();
        assert!(
            refusal.to_string().contains(crate::miner::REVEAL_TOO_EARLY),
            "{refusal}"
        );
        w.miners[0].1.handle(
            MinerInput::UploadAnswered {
                job_id: job0(),
                result: Err(refusal.to_string()),
            },
            local + 2,
            &mut w.rng,
        );
        let j = w.miners[0].1.job(&job0()).unwrap();
        assert_eq!(j.phase, crate::MinerPhase::Committed, "{}", j.detail);
        let (_, soon) = sent(
            &w.miners[0]
                .1
                .handle(MinerInput::Tick, local + 500, &mut w.rng),
        );
        assert!(soon.is_none());
        let (_, again) = sent(
            &w.miners[0]
                .1
                .handle(MinerInput::Tick, local + 1001, &mut w.rng),
        );
        let again = again.expect("the reveal again, a second later");
        w.now = deadline + 1021;
        w.tick();
        w.v.uploaded(&again, w.now, &mut w.rng).unwrap();
    }
    // Uncorrected, the clock behind would have committed 27 s after the deadline: refused.
    let mut w = World::new(1, 1);
    w.tick();
    let slot = w.v.job(&job0()).unwrap().slots.values().next().unwrap();
    let deadline = slot.assignment.deadline_ms;
    let c = train(&mut w.miners[0].1, &job0(), b"art", w.now + 10, &mut w.rng);
    assert!(matches!(
        w.v.commit(c, deadline + 27_000),
        Err(ValidatorError::TooLate { .. })
    ));
}

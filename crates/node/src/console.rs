//! The admin console (`ConsoleService`) on the validator. Every call checks the caller's
//! token and role first; changes are written to the audit log; anything that touches a
//! competition runs inside the validator loop. Job state leaves only through
//! [`redacted_job`]: no nonce, and no unscored commitment, is ever shown.

use crate::auth::{self, Action, Role, TokenRecord};
use crate::config::CompetitionConfig;
use crate::registry;
use crate::validator::{Comp, CompState, Shared, Validator, leaderboard_of, prepare};
use serde_json::Value;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tunenet_engine::{JobPhase, JobState};
use tunenet_proto::v1::Leaderboard;
use tunenet_rpc::services as pb;
use tunenet_rpc::services::console_service_server::{ConsoleService, ConsoleServiceServer};
use tunenet_store::{StoreExt, trees};
use tunenet_types::{CompetitionId, JobScore, time::now_ms};

/// The console service for a running validator.
pub(crate) fn server(
    shared: Arc<Shared>,
    limits: &crate::limits::Limits,
) -> ConsoleServiceServer<Console> {
    ConsoleServiceServer::new(Console {
        shared,
        throttle: crate::limits::LoginThrottle::new(limits),
    })
}

pub(crate) struct Console {
    shared: Arc<Shared>,
    /// Failed logins per address (none: unlimited).
    throttle: Option<Arc<crate::limits::LoginThrottle>>,
}

fn bearer<T>(req: &Request<T>) -> Option<String> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    Some(v.strip_prefix("Bearer ").unwrap_or(v).trim().to_string())
}

fn info(c: &Comp) -> pb::CompetitionInfo {
    let jobs: Vec<_> = c.engine.jobs().collect();
    let done = jobs
        .iter()
        .filter(|j| matches!(j.phase, tunenet_engine::JobPhase::Done { .. }))
        .count();
    let running = jobs
        .iter()
        .filter(|j| {
            !matches!(
                j.phase,
                tunenet_engine::JobPhase::Done { .. } | tunenet_engine::JobPhase::Pending
            )
        })
        .count();
    let state = if c.record.state == CompState::Running && c.engine.is_finished() {
        "finished".to_string()
    } else {
        c.record.state.to_string()
    };
    pb::CompetitionInfo {
        id: c.id().to_string(),
        state,
        jobs_total: jobs.len() as u32,
        jobs_done: done as u32,
        jobs_running: running as u32,
        miners_per_job: c.record.config.miners_per_job,
        time_budget_secs: c.record.config.time_budget_secs,
    }
}

fn miner_pb(r: registry::MinerRecord) -> pb::MinerRecord {
    pb::MinerRecord {
        peer_id: r.peer_id,
        owner: r.owner,
        endpoint: r.endpoint,
        banned: r.banned,
        ban_reason: r.ban_reason,
        registered_at_ms: r.registered_at_ms,
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Shown in place of an assignment nonce.
pub const REDACTED: &str = "redacted";
/// Shown in place of another miner's commitment before its job is scored.
pub const RECEIVED: &str = "received (shown once the job is scored)";
/// Shown in place of a commitment hash (in receipts) before its job is scored.
pub const HIDDEN: &str = "hidden until the job is scored";

/// A job as the console shows it. Assignment nonces are secrets between the validator and
/// each miner, so no role ever sees one: every `nonce` field, wherever the engine keeps it,
/// becomes [`REDACTED`]. Commitments are shown once the job is done; before that only
/// whether one was received (`committed`; the commitment becomes [`RECEIVED`] and every
/// `commit` hash in the slot, as in its receipts, [`HIDDEN`]), except `own`'s: a miner may
/// see its own.
pub fn redacted_job(job: &JobState, own: Option<&str>) -> serde_json::Result<Value> {
    let done = matches!(job.phase, JobPhase::Done { .. });
    let mut v = serde_json::to_value(job)?;
    redact(&mut v, done, own);
    Ok(v)
}

/// [`redacted_job`] on the serialised job, so that fields the engine adds later are covered
/// by name.
fn redact(job: &mut Value, done: bool, own: Option<&str>) {
    if let Some(slots) = job.get_mut("slots").and_then(Value::as_object_mut) {
        for (miner, slot) in slots.iter_mut() {
            let Some(fields) = slot.as_object_mut() else {
                continue;
            };
            let committed = fields.get("commitment").is_some_and(|c| !c.is_null());
            fields.insert("committed".into(), Value::Bool(committed));
            if done || own == Some(miner.as_str()) {
                continue;
            }
            if committed {
                fields.insert("commitment".into(), Value::from(RECEIVED));
            }
            replace_all(slot, "commit", HIDDEN);
        }
    }
    replace_all(job, "nonce", REDACTED);
}

/// Replaces the value of every `key` field, at any depth, by `with`.
fn replace_all(v: &mut Value, key: &str, with: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == key {
                    *x = Value::from(with);
                } else {
                    replace_all(x, key, with);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| replace_all(x, key, with)),
        _ => {}
    }
}

/// The status a refused registration is answered with.
fn registry_status(e: registry::RegistryError) -> Status {
    use registry::RegistryError as E;
    match e {
        E::Banned { .. } => Status::failed_precondition(e.to_string()),
        E::OtherOwner { .. } => Status::permission_denied(e.to_string()),
        E::Unknown(_) => Status::not_found(e.to_string()),
        E::Field { .. } | E::OwnerFull { .. } => Status::invalid_argument(e.to_string()),
    }
}

/// Parses a competition spec (TOML or JSON), naming the field that is wrong.
pub fn parse_spec(format: &str, text: &str) -> Result<CompetitionConfig, String> {
    let cfg: CompetitionConfig = match format {
        "toml" | "" => toml::from_str(text).map_err(|e| format!("spec: {e}"))?,
        "json" => serde_json::from_str(text).map_err(|e| format!("spec: {e}"))?,
        other => return Err(format!("unknown spec format `{other}`: use toml or json")),
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

impl Console {
    /// The caller's token record. An address that keeps failing is refused for a while
    /// (`[limits] failed_logins`), and each refused login is audited.
    fn authenticate<T>(&self, req: &Request<T>) -> Result<TokenRecord, Status> {
        let ip = req.remote_addr().map(|a| a.ip());
        if let (Some(t), Some(ip)) = (&self.throttle, ip) {
            t.check(ip).map_err(Status::resource_exhausted)?;
        }
        let token = bearer(req);
        let store = self.shared.store.as_ref();
        auth::verify(store, token.as_deref(), now_ms()).map_err(|e| {
            let locked = match (&self.throttle, ip) {
                (Some(t), Some(ip)) => t.failed(ip),
                _ => false,
            };
            let from = ip
                .map(|i| i.to_string())
                .unwrap_or_else(|| "an unknown address".into());
            auth::audit_refused(store, &from, &e.to_string(), locked);
            Status::unauthenticated(e.to_string())
        })
    }

    fn check<T>(
        &self,
        req: &Request<T>,
        action: Action,
        what: &str,
    ) -> Result<TokenRecord, Status> {
        let rec = self.authenticate(req)?;
        auth::permit(&rec, action, what).map_err(|e| Status::permission_denied(e.to_string()))?;
        Ok(rec)
    }

    /// After a registry change: every engine sees the new miner list and bans.
    async fn miners_changed(
        &self,
        rec: registry::MinerRecord,
    ) -> Result<Response<pb::MinerRecord>, Status> {
        self.shared
            .with(|v: &mut Validator| {
                v.refresh_miners();
                Ok(())
            })
            .await?;
        Ok(Response::new(miner_pb(rec)))
    }

    fn audit(&self, who: &TokenRecord, action: &str, detail: &str) {
        auth::audit(self.shared.store.as_ref(), who, action, detail);
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ConsoleEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ConsoleService for Console {
    async fn who_am_i(&self, req: Request<pb::Empty>) -> Result<Response<pb::Whoami>, Status> {
        let rec = self.authenticate(&req)?;
        Ok(Response::new(pb::Whoami {
            id: rec.id,
            role: rec.role.to_string(),
            name: rec.name,
        }))
    }

    async fn create_competition(
        &self,
        req: Request<pb::CompetitionSpec>,
    ) -> Result<Response<pb::CompetitionInfo>, Status> {
        let who = self.check(&req, Action::RunCompetitions, "create competitions")?;
        let spec = req.into_inner();
        let cfg = parse_spec(&spec.format, &spec.text).map_err(Status::invalid_argument)?;
        let store = self.shared.store.clone();
        if store
            .get(trees::COMPETITIONS, &cfg.id)
            .map_err(internal)?
            .is_some()
        {
            return Err(Status::already_exists(format!(
                "field `id`: competition `{}` already exists",
                cfg.id
            )));
        }
        let blobs = self.shared.blobs.clone();
        let reply_to = self.shared.reply_to.clone();
        let devices = self.shared.eval_devices.clone();
        let c2 = cfg.clone();
        let mut record = tokio::task::spawn_blocking(move || {
            prepare(store.as_ref(), &blobs, &c2, &reply_to, &devices)
        })
        .await
        .map_err(internal)?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        record.state = CompState::Created;
        // A finished competition's test split is published for its receipts: a new one
        // drawing the same split would be scored on records miners already hold.
        let published = self.shared.public.read().is_ok_and(|p| {
            p.contains(&record.test_blob) || record.control_blob.is_some_and(|b| p.contains(&b))
        });
        if published {
            return Err(Status::invalid_argument(
                "field `seed`: this dataset, seed and test_fraction give the hidden records of a finished competition, which were published for its receipts; choose another seed",
            ));
        }
        self.shared
            .store
            .put_json(trees::COMPETITIONS, &cfg.id, &record)
            .map_err(internal)?;
        self.audit(&who, "competition.create", &cfg.id);
        let id = cfg.id.clone();
        let info = self
            .shared
            .with(move |v: &mut Validator| {
                v.add(record);
                Ok(info(v.comp(&id)?))
            })
            .await?;
        Ok(Response::new(info))
    }

    async fn list_competitions(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::CompetitionList>, Status> {
        self.check(&req, Action::Read, "list competitions")?;
        let competitions = self
            .shared
            .with(|v: &mut Validator| Ok(v.comps.iter().map(info).collect()))
            .await?;
        Ok(Response::new(pb::CompetitionList { competitions }))
    }

    async fn show_competition(
        &self,
        req: Request<pb::CompetitionRef>,
    ) -> Result<Response<pb::CompetitionDetail>, Status> {
        self.check(&req, Action::Read, "read competitions")?;
        let id = req.into_inner().id;
        let detail = self
            .shared
            .with(move |v: &mut Validator| {
                let i = v.comps.iter().position(|c| c.id() == id).ok_or_else(|| {
                    Status::not_found(format!("no competition `{id}` on this validator"))
                })?;
                let eligibility =
                    serde_json::to_string_pretty(&v.eligibility(i)).map_err(internal)?;
                let c = &v.comps[i];
                let jobs = c
                    .engine
                    .jobs()
                    .map(|j| redacted_job(j, None))
                    .collect::<serde_json::Result<Vec<_>>>()
                    .map_err(internal)?;
                Ok(pb::CompetitionDetail {
                    info: Some(info(c)),
                    jobs_json: serde_json::to_string_pretty(&jobs).map_err(internal)?,
                    config_json: serde_json::to_string_pretty(&config_view(&c.record))
                        .map_err(internal)?,
                    eligibility_json: eligibility,
                })
            })
            .await?;
        Ok(Response::new(detail))
    }

    async fn change_competition(
        &self,
        req: Request<pb::StateChange>,
    ) -> Result<Response<pb::CompetitionInfo>, Status> {
        let who = self.check(
            &req,
            Action::RunCompetitions,
            "start, pause or stop competitions",
        )?;
        let ch = req.into_inner();
        let (id, action) = (ch.id.clone(), ch.action.clone());
        let info = self
            .shared
            .with(move |v: &mut Validator| {
                v.change(&id, &action)?;
                Ok(info(v.comp(&id)?))
            })
            .await?;
        self.audit(&who, &format!("competition.{}", ch.action), &ch.id);
        Ok(Response::new(info))
    }

    async fn set_integrity(
        &self,
        req: Request<pb::IntegrityChange>,
    ) -> Result<Response<pb::IntegrityView>, Status> {
        let who = self.check(&req, Action::Integrity, "change integrity settings")?;
        let r = req.into_inner();
        let change: serde_json::Value = serde_json::from_str(&r.settings_json)
            .map_err(|e| Status::invalid_argument(format!("settings_json is not JSON: {e}")))?;
        let id = r.id.clone();
        let store = self.shared.store.clone();
        let view = self
            .shared
            .with(move |v: &mut Validator| {
                let c = v.comp(&id)?;
                let mut current =
                    serde_json::to_value(&c.record.plan.integrity).map_err(internal)?;
                match (current.as_object_mut(), change.as_object()) {
                    (Some(cur), Some(ch)) => {
                        for (k, val) in ch {
                            cur.insert(k.clone(), val.clone());
                        }
                    }
                    _ => {
                        return Err(Status::invalid_argument(
                            "settings_json must be a JSON object of fields",
                        ));
                    }
                }
                let mut settings: tunenet_types::IntegritySettings =
                    serde_json::from_value(current).map_err(|e| {
                        Status::invalid_argument(format!("integrity settings: {e}"))
                    })?;
                // How the synthetic set is drawn follows from the competition's generator.
                settings.synthetic_alike = c.record.plan.integrity.synthetic_alike;
                settings.synthetic_paired = c.record.plan.integrity.synthetic_paired;
                c.record.config.integrity = settings.clone();
                c.record.plan.integrity = settings.clone();
                c.engine.set_integrity(settings.clone());
                store
                    .put_json(trees::COMPETITIONS, &id, &c.record)
                    .map_err(internal)?;
                Ok(pb::IntegrityView {
                    id: id.clone(),
                    settings_json: serde_json::to_string(&settings).map_err(internal)?,
                })
            })
            .await?;
        self.audit(
            &who,
            "competition.integrity",
            &format!("{}: {}", r.id, r.settings_json),
        );
        Ok(Response::new(view))
    }

    async fn competition_leaderboard(
        &self,
        req: Request<pb::CompetitionRef>,
    ) -> Result<Response<Leaderboard>, Status> {
        self.check(&req, Action::Leaderboard, "read leaderboards")?;
        let r = req.into_inner();
        let (id, by_median) = (r.id, r.by_median);
        let lb = self
            .shared
            .with(move |v: &mut Validator| {
                v.comp(&id)?;
                let i = v.comps.iter().position(|c| c.id() == id).unwrap_or(0);
                Ok(crate::quorum::leaderboard(v, i, by_median))
            })
            .await?;
        Ok(Response::new(lb.into()))
    }

    async fn overall_leaderboard(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<Leaderboard>, Status> {
        self.check(&req, Action::Leaderboard, "read leaderboards")?;
        let lb = self
            .shared
            .with(|v: &mut Validator| {
                let mut scores: Vec<JobScore> = Vec::new();
                let (mut done, mut total) = (0, 0);
                for c in &v.comps {
                    let lb = leaderboard_of(&c.engine);
                    done += lb.jobs_done;
                    total += lb.jobs_total;
                    scores.extend(c.engine.jobs().flat_map(|j| j.scores.clone()));
                }
                let id = CompetitionId::new("overall").map_err(internal)?;
                Ok(tunenet_types::leaderboard(&id, &scores, done, total))
            })
            .await?;
        Ok(Response::new(lb.into()))
    }

    async fn register_miner(
        &self,
        req: Request<pb::MinerRegistration>,
    ) -> Result<Response<pb::MinerRecord>, Status> {
        let who = self.check(&req, Action::ManageMiners, "register miners")?;
        let r = req.into_inner();
        let rec = registry::register(
            self.shared.store.as_ref(),
            &r.peer_id,
            &r.owner,
            &r.endpoint,
            now_ms(),
        )
        .map_err(internal)?
        .map_err(registry_status)?;
        self.audit(
            &who,
            "miner.register",
            &format!("{} owner {}", r.peer_id, r.owner),
        );
        self.miners_changed(rec).await
    }

    async fn ban_miner(
        &self,
        req: Request<pb::BanRequest>,
    ) -> Result<Response<pb::MinerRecord>, Status> {
        let who = self.check(&req, Action::ManageMiners, "ban miners")?;
        let r = req.into_inner();
        let rec = registry::set_ban(
            self.shared.store.as_ref(),
            &r.peer_id,
            true,
            &r.reason,
            now_ms(),
        )
        .map_err(internal)?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.audit(&who, "miner.ban", &format!("{}: {}", r.peer_id, r.reason));
        self.miners_changed(rec).await
    }

    async fn unban_miner(
        &self,
        req: Request<pb::BanRequest>,
    ) -> Result<Response<pb::MinerRecord>, Status> {
        let who = self.check(&req, Action::ManageMiners, "unban miners")?;
        let r = req.into_inner();
        let rec = registry::set_ban(self.shared.store.as_ref(), &r.peer_id, false, "", now_ms())
            .map_err(internal)?
            .map_err(|e| Status::not_found(e.to_string()))?;
        self.audit(&who, "miner.unban", &r.peer_id);
        self.miners_changed(rec).await
    }

    async fn list_miners(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::MinerList>, Status> {
        self.check(&req, Action::Read, "list miners")?;
        let miners = registry::list(self.shared.store.as_ref())
            .map_err(internal)?
            .into_iter()
            .map(miner_pb)
            .collect();
        // Every job each miner was scored in: (quality, time budget).
        let scored = self
            .shared
            .with(|v: &mut Validator| {
                let mut by: std::collections::HashMap<String, Vec<(f64, u64)>> = Default::default();
                for c in &v.comps {
                    for j in c.engine.jobs() {
                        for s in &j.scores {
                            by.entry(s.miner.0.clone())
                                .or_default()
                                .push((s.quality, j.plan.time_budget_ms));
                        }
                    }
                }
                Ok(by)
            })
            .await?;
        let hardware = crate::hardware::records(self.shared.store.as_ref())
            .into_iter()
            .map(|r| {
                let value = crate::hardware::value_of(
                    &r,
                    scored.get(&r.miner).map(Vec::as_slice).unwrap_or_default(),
                );
                pb::MinerHardware {
                    miner: r.miner.clone(),
                    addr: r.addr.clone(),
                    inventory: r.inventory.summary(),
                    verified: r.summary(),
                    flags: r.flags.clone(),
                    updated_at_ms: r.updated_at_ms,
                    record_json: serde_json::to_string(&r).unwrap_or_default(),
                    price_per_gpu_hour: value.price_per_gpu_hour,
                    devices: value.devices,
                    cost_per_job: value.cost_per_job,
                    jobs_scored: value.jobs_scored,
                    mean_quality: value.mean_quality,
                    quality_per_cost: value.quality_per_cost,
                    verified_tflops: r.best_verified_tflops(),
                }
            })
            .collect();
        Ok(Response::new(pb::MinerList { miners, hardware }))
    }

    async fn my_jobs(&self, req: Request<pb::Empty>) -> Result<Response<pb::MyJobs>, Status> {
        let who = self.check(&req, Action::OwnJobs, "read its own jobs")?;
        let me = who.miner_peer_id.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this token names no miner; issue a miner token with --miner-peer-id",
            )
        })?;
        let jobs = self
            .shared
            .with(move |v: &mut Validator| {
                let mut out = Vec::new();
                for c in &v.comps {
                    for j in c.engine.jobs() {
                        let slot = if j.slots.keys().any(|p| p.0 == me) {
                            let mut v = redacted_job(j, Some(&me)).map_err(internal)?;
                            v["slots"].get_mut(&me).map(Value::take)
                        } else {
                            None
                        };
                        let offer = j.offers.values().find(|o| match o {
                            tunenet_engine::OfferState::Accepted { miner, .. }
                            | tunenet_engine::OfferState::Rejected { miner, .. } => miner.0 == me,
                            _ => false,
                        });
                        if slot.is_none() && offer.is_none() {
                            continue;
                        }
                        out.push(serde_json::json!({
                            "competition": c.id(),
                            "job": j.plan.job_id,
                            "phase": j.phase,
                            "offer": offer,
                            "submission": slot.as_ref().map(|s| &s["submission"]),
                            "committed": slot.as_ref().map(|s| &s["committed"]),
                            "commitment": slot.as_ref().map(|s| &s["commitment"]),
                            "receipt": slot.as_ref().map(|s| &s["receipt"]),
                            "score": j.scores.iter().find(|s| s.miner.0 == me),
                        }));
                    }
                }
                serde_json::to_string_pretty(&out).map_err(internal)
            })
            .await?;
        Ok(Response::new(pb::MyJobs { jobs_json: jobs }))
    }

    async fn create_token(
        &self,
        req: Request<pb::TokenRequest>,
    ) -> Result<Response<pb::TokenIssued>, Status> {
        let who = self.check(&req, Action::ManageTokens, "issue tokens")?;
        let r = req.into_inner();
        let role: Role = r.role.parse().map_err(Status::invalid_argument)?;
        if r.name.trim().is_empty() {
            return Err(Status::invalid_argument(
                "field `name`: say who holds the token",
            ));
        }
        let miner = (!r.miner_peer_id.is_empty()).then(|| r.miner_peer_id.clone());
        if role == Role::Miner && miner.is_none() {
            return Err(Status::invalid_argument(
                "field `miner_peer_id`: a miner token must name its miner",
            ));
        }
        let (token, rec) =
            auth::issue(self.shared.store.as_ref(), role, &r.name, r.ttl_secs, miner)
                .map_err(internal)?;
        self.audit(
            &who,
            "token.create",
            &format!("{} role {} for {}", rec.id, role, r.name),
        );
        Ok(Response::new(pb::TokenIssued { token, id: rec.id }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::TokenRef>,
    ) -> Result<Response<pb::Empty>, Status> {
        let who = self.check(&req, Action::ManageTokens, "revoke tokens")?;
        let id = req.into_inner().id;
        if !auth::revoke(self.shared.store.as_ref(), &id).map_err(internal)? {
            return Err(Status::not_found(format!(
                "no token with id `{id}` (see `tunenet console token list`)"
            )));
        }
        self.audit(&who, "token.revoke", &id);
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::TokenList>, Status> {
        self.check(&req, Action::ManageTokens, "list tokens")?;
        let tokens = auth::list(self.shared.store.as_ref())
            .map_err(internal)?
            .into_iter()
            .map(|t| pb::TokenInfo {
                id: t.id,
                role: t.role.to_string(),
                name: t.name,
                created_at_ms: t.created_at_ms,
                expires_at_ms: t.expires_at_ms,
                revoked: t.revoked,
                miner_peer_id: t.miner_peer_id.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::TokenList { tokens }))
    }

    async fn audit(&self, req: Request<pb::Empty>) -> Result<Response<pb::AuditList>, Status> {
        self.check(&req, Action::ManageTokens, "read the audit log")?;
        let entries = auth::audit_log(self.shared.store.as_ref())
            .map_err(internal)?
            .into_iter()
            .map(|e| pb::AuditEntry {
                at_ms: e.at_ms,
                actor: e.actor,
                role: e.role.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                action: e.action,
                detail: e.detail,
            })
            .collect();
        Ok(Response::new(pb::AuditList { entries }))
    }

    type WatchStream = EventStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<EventStream>, Status> {
        self.check(&req, Action::Read, "watch events")?;
        let filter = req.into_inner().competition_id;
        let rx = self.shared.events.subscribe();
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| match e {
                Ok(e) if filter.is_empty() || e.competition == filter => {
                    Some(Ok(pb::ConsoleEvent {
                        at_ms: e.at_ms,
                        competition_id: e.competition,
                        job_id: e.job,
                        message: e.message,
                    }))
                }
                Ok(_) => None,
                // A slow reader missed events: say so instead of silently skipping.
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Ok(pb::ConsoleEvent {
                        at_ms: now_ms(),
                        competition_id: String::new(),
                        job_id: String::new(),
                        message: format!("({n} events skipped: the reader was too slow)"),
                    }))
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn replay(
        &self,
        req: Request<pb::ReplayRequest>,
    ) -> Result<Response<pb::ReplayResult>, Status> {
        self.check(&req, Action::Leaderboard, "replay scoring")?;
        let r = req.into_inner();
        let proposed: tunenet_types::ScoringWeights = serde_json::from_str(&r.scoring_json)
            .map_err(|e| {
                Status::invalid_argument(format!(
                    "not a scoring formula ({e}); give test, synthetic, penalty_quality and temperature"
                ))
            })?;
        proposed.check().map_err(Status::invalid_argument)?;
        let id = r.competition_id.clone();
        let weights = proposed.clone();
        let (now, replayed, jobs, current) = self
            .shared
            .with(move |v: &mut Validator| {
                let engine = &v.comp(&id)?.engine;
                let now = leaderboard_of(engine);
                let (scores, jobs) = tunenet_engine::replay_scores(engine.jobs(), &weights);
                let mut replayed = tunenet_types::leaderboard(
                    &engine.plan().id,
                    &scores,
                    now.jobs_done,
                    now.jobs_total,
                );
                replayed.kind = now.kind;
                Ok((now, replayed, jobs, engine.plan().scoring.clone()))
            })
            .await?;
        Ok(Response::new(pb::ReplayResult {
            now: Some(now.into()),
            replayed: Some(replayed.into()),
            scoring_now_json: serde_json::to_string(&current).map_err(internal)?,
            scoring_replayed_json: serde_json::to_string(&proposed).map_err(internal)?,
            jobs_replayed: jobs,
        }))
    }

    async fn receipts(
        &self,
        req: Request<pb::ReceiptRequest>,
    ) -> Result<Response<pb::ReceiptList>, Status> {
        let who = self.check(&req, Action::Leaderboard, "read evaluation receipts")?;
        let r = req.into_inner();
        // A miner token sees its own receipts only; a role that reads everything sees any.
        let miner = if who.role.allows(Action::Read) {
            (!r.miner.is_empty()).then_some(r.miner)
        } else {
            let me = who.miner_peer_id.clone().ok_or_else(|| {
                Status::failed_precondition(
                    "this token names no miner; issue a miner token with --miner-peer-id",
                )
            })?;
            if !r.miner.is_empty() && r.miner != me {
                return Err(Status::permission_denied(
                    "a miner token reads its own receipts only",
                ));
            }
            Some(me)
        };
        let id = r.competition_id.clone();
        let job = (!r.job_id.is_empty()).then_some(r.job_id);
        let (mut receipts, published) = self
            .shared
            .with(move |v: &mut Validator| {
                let finished = v.comp(&id)?.engine.is_finished();
                let rs =
                    crate::receipts::load(v.store.as_ref(), &id, job.as_deref(), miner.as_deref())
                        .map_err(internal)?;
                Ok((rs, finished))
            })
            .await?;
        if !published {
            // Per-record losses on hidden records stay hidden with them until the end.
            for r in &mut receipts {
                r.losses.clear();
            }
        }
        Ok(Response::new(pb::ReceiptList {
            receipts_json: serde_json::to_string_pretty(&receipts).map_err(internal)?,
            published,
        }))
    }

    async fn file_dispute(
        &self,
        req: Request<pb::DisputeRequest>,
    ) -> Result<Response<pb::DisputeList>, Status> {
        let who = self.check(&req, Action::OwnJobs, "dispute its receipts")?;
        let me = who.miner_peer_id.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this token names no miner; a dispute is filed with a miner token (--miner-peer-id)",
            )
        })?;
        let r = req.into_inner();
        let recomputed: crate::receipts::Verification = serde_json::from_str(&r.recomputed_json)
            .map_err(|e| {
                Status::invalid_argument(format!(
                    "not a recomputation ({e}); give what `tunenet verify-receipt --json` prints"
                ))
            })?;
        let (id, job, miner) = (r.competition_id.clone(), r.job_id.clone(), me.clone());
        let reason = r.reason;
        let filed = self
            .shared
            .with(move |v: &mut Validator| {
                let c = v.comp(&id)?;
                if !c.engine.is_finished() {
                    return Err(Status::failed_precondition(format!(
                        "competition `{id}` has not finished: its hidden sets are published, and receipts can be disputed, once it has"
                    )));
                }
                let window_ms = c.record.config.dispute_window_secs.saturating_mul(1000);
                let store = v.store.as_ref();
                let receipt = crate::receipts::load(store, &id, Some(&job), Some(&miner))
                    .map_err(internal)?
                    .pop()
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "no evaluation receipt for miner {miner} in job `{job}` of `{id}`"
                        ))
                    })?;
                let now = tunenet_types::time::now_ms();
                let finished = crate::receipts::finished_at(store, &id)
                    .map_err(internal)?
                    .unwrap_or(now);
                crate::receipts::file_dispute(
                    store,
                    receipt,
                    &recomputed,
                    &reason,
                    finished,
                    window_ms,
                    now,
                )
                .map_err(Status::failed_precondition)
            })
            .await?;
        self.audit(
            &who,
            "dispute.file",
            &format!(
                "{} {}: {} of {} records disagree",
                r.competition_id,
                r.job_id,
                filed.comparison.disagreeing.len(),
                filed.comparison.records
            ),
        );
        Ok(Response::new(pb::DisputeList {
            disputes_json: serde_json::to_string_pretty(&[filed]).map_err(internal)?,
        }))
    }

    async fn disputes(
        &self,
        req: Request<pb::CompetitionRef>,
    ) -> Result<Response<pb::DisputeList>, Status> {
        let who = self.check(&req, Action::Leaderboard, "read disputes")?;
        let miner = if who.role.allows(Action::Read) {
            None
        } else {
            Some(
                who.miner_peer_id
                    .clone()
                    .ok_or_else(|| Status::failed_precondition("this token names no miner"))?,
            )
        };
        let id = req.into_inner().id;
        let found = self
            .shared
            .with(move |v: &mut Validator| {
                v.comp(&id)?;
                crate::receipts::disputes(v.store.as_ref(), &id, miner.as_deref()).map_err(internal)
            })
            .await?;
        Ok(Response::new(pb::DisputeList {
            disputes_json: serde_json::to_string_pretty(&found).map_err(internal)?,
        }))
    }

    async fn export(
        &self,
        req: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportData>, Status> {
        self.check(&req, Action::Read, "export results")?;
        let r = req.into_inner();
        let id = r.competition_id.clone();
        let scores: Vec<JobScore> = self
            .shared
            .with(move |v: &mut Validator| {
                Ok(v.comp(&id)?
                    .engine
                    .jobs()
                    .flat_map(|j| j.scores.clone())
                    .collect())
            })
            .await?;
        let data = match r.format.as_str() {
            "json" | "" => pb::ExportData {
                content_type: "application/json".into(),
                data: serde_json::to_string_pretty(&scores).map_err(internal)?,
            },
            "csv" => {
                let mut s = String::from("competition,job,miner,loss,quality,penalty_reason\n");
                for x in &scores {
                    let reason = x
                        .penalty_reason
                        .clone()
                        .unwrap_or_default()
                        .replace('"', "\"\"");
                    s.push_str(&format!(
                        "{},{},{},{},{},\"{}\"\n",
                        r.competition_id,
                        x.job_id,
                        x.miner,
                        x.loss.map(|l| l.to_string()).unwrap_or_default(),
                        x.quality,
                        reason
                    ));
                }
                pb::ExportData {
                    content_type: "text/csv".into(),
                    data: s,
                }
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown format `{other}`: use csv or json"
                )));
            }
        };
        Ok(Response::new(data))
    }
}

/// A competition's spec as shown to the console, with the commit and file hashes its hub
/// ids were pinned to (not where the validator's cache keeps them).
fn config_view(rec: &crate::validator::CompetitionRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(&rec.config).unwrap_or_default();
    if !rec.pins.is_empty()
        && let Some(o) = v.as_object_mut()
    {
        let pins: Vec<serde_json::Value> = rec
            .pins
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id.to_string(),
                    "commit": p.commit,
                    "blake3": p.files,
                })
            })
            .collect();
        o.insert("pins".into(), pins.into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunenet_types::{Assignment, BlobId, Commitment, HparamBounds, JobId, PeerIdStr, Receipt};

    const A: &str = "12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "12D3KooWBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const NONCE: [u8; 32] = [0xAB; 32];

    fn blob(b: u8) -> BlobId {
        BlobId([b; 32])
    }

    /// The hex of a miner's commitment hash, so leaks can be searched for as text.
    fn commit_of(miner: &str) -> BlobId {
        blob(miner.as_bytes()[8])
    }

    fn slot(miner: &str, committed: bool) -> Value {
        let job_id = JobId::new("live-0").unwrap();
        let assignment = Assignment {
            job_id: job_id.clone(),
            competition_id: CompetitionId::new("live").unwrap(),
            miner: PeerIdStr(miner.into()),
            validator: PeerIdStr(B.into()),
            validator_key: vec![1, 2],
            nonce: NONCE,
            base_model: blob(1),
            train_shard: blob(2),
            hparams: HparamBounds::default(),
            deadline_ms: 10_000,
            max_artifact_bytes: 1 << 20,
            signature: vec![3; 64],
        };
        let commitment = Commitment {
            job_id: job_id.clone(),
            miner: PeerIdStr(miner.into()),
            miner_key: vec![4],
            commit: commit_of(miner),
            artifact_size: 99,
            signature: vec![5; 64],
        };
        let receipt = Receipt {
            job_id,
            miner: PeerIdStr(miner.into()),
            commit: commit_of(miner),
            received_at_ms: 4_321,
            validator: PeerIdStr(B.into()),
            validator_key: vec![1, 2],
            signature: vec![6; 64],
        };
        serde_json::json!({
            "addr": "http://127.0.0.1:1",
            "assignment": assignment,
            "commitment": committed.then_some(commitment),
            "receipt": committed.then_some(receipt),
            "submission": "Waiting",
        })
    }

    fn job(phase: Value) -> JobState {
        serde_json::from_value(serde_json::json!({
            "competition_id": "live",
            "plan": {
                "job_id": "live-0",
                "base_model": blob(1),
                "base_params": 10,
                "train_shard": blob(2),
                "shard_records": 10,
                "time_budget_ms": 10_000,
                "reward_hint": 1.0,
            },
            "phase": phase,
            "offers": {},
            "slots": { A: slot(A, true), B: slot(B, false) },
            "scores": [],
        }))
        .unwrap()
    }

    fn running() -> JobState {
        job(serde_json::json!({ "Running": { "deadline": 10_000 } }))
    }

    /// Whether the assignment nonce appears anywhere, in the engine's encoding or in hex.
    fn has_nonce(v: &Value) -> bool {
        let text = v.to_string();
        let as_array = serde_json::to_string(&NONCE.to_vec()).unwrap();
        text.contains(&as_array) || text.contains(&hex::encode(NONCE))
    }

    #[test]
    fn no_role_sees_a_nonce_in_any_phase() {
        let raw = serde_json::to_value(running()).unwrap();
        assert!(has_nonce(&raw), "the test's nonce is in the raw state");
        for phase in [
            serde_json::json!({ "Running": { "deadline": 10_000 } }),
            serde_json::json!({ "Revealing": { "deadline": 10_000, "until": 20_000 } }),
            serde_json::json!({ "Done": { "note": null } }),
        ] {
            let j = job(phase);
            for own in [None, Some(A), Some(B)] {
                let v = redacted_job(&j, own).unwrap();
                assert!(!has_nonce(&v), "{own:?}: {v}");
                assert_eq!(v["slots"][A]["assignment"]["nonce"], REDACTED);
                // The rest of the assignment is still shown.
                assert_eq!(v["slots"][A]["assignment"]["deadline_ms"], 10_000);
            }
        }
    }

    #[test]
    fn commitments_stay_hidden_until_the_job_is_scored() {
        let hash = commit_of(A).to_string();
        assert!(serde_json::to_string(&running()).unwrap().contains(&hash));
        for j in [
            running(),
            job(serde_json::json!({ "Revealing": { "deadline": 10_000, "until": 20_000 } })),
        ] {
            let v = redacted_job(&j, None).unwrap();
            assert!(!v.to_string().contains(&hash), "{v}");
            let (a, b) = (&v["slots"][A], &v["slots"][B]);
            assert_eq!(a["committed"], true);
            assert_eq!(a["commitment"], RECEIVED);
            assert_eq!(a["receipt"]["commit"], HIDDEN);
            assert_eq!(a["receipt"]["received_at_ms"], 4_321);
            assert_eq!(b["committed"], false);
            assert!(b["commitment"].is_null() && b["receipt"].is_null());
            // Another miner's view hides it too; the miner itself sees its own.
            let other = redacted_job(&j, Some(B)).unwrap();
            assert!(!other.to_string().contains(&hash), "{other}");
            let mine = redacted_job(&j, Some(A)).unwrap();
            assert_eq!(mine["slots"][A]["commitment"]["commit"], hash.as_str());
            assert!(!has_nonce(&mine));
        }
        let done =
            redacted_job(&job(serde_json::json!({ "Done": { "note": null } })), None).unwrap();
        assert_eq!(done["slots"][A]["commitment"]["commit"], hash.as_str());
        assert_eq!(done["slots"][A]["receipt"]["commit"], hash.as_str());
        assert_eq!(done["slots"][A]["committed"], true);
    }

    #[test]
    fn commit_hashes_in_fields_added_later_are_hidden_too() {
        let hash = commit_of(A).to_string();
        let mut v = serde_json::to_value(running()).unwrap();
        let receipt = v["slots"][A]["receipt"].clone();
        v["slots"][A]["superseded"] = serde_json::json!([receipt]);
        v["slots"][A]["assignment"]["extra"] = serde_json::json!({ "nonce": NONCE });
        redact(&mut v, false, None);
        assert!(!v.to_string().contains(&hash), "{v}");
        assert!(!has_nonce(&v), "{v}");
        assert_eq!(v["slots"][A]["superseded"][0]["commit"], HIDDEN);
    }
}

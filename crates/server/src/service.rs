use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lsplit_model::{ComputeDevice, ModelPart, TrunkFingerprint};
use lsplit_proto::pb::session_reply::Kind as ReplyKind;
use lsplit_proto::pb::session_request::Kind as RequestKind;
use lsplit_proto::pb::{self, SessionReply, SessionRequest};
use lsplit_proto::{PROTOCOL_VERSION, codec_from_pb, codec_to_pb, fingerprint_to_pb};
use lsplit_split::TrunkState;
use lsplit_wire::{Codec, HiddenRows};
use tokio::sync::oneshot;
use tonic::Status;

use crate::engine::{Done, Engine, Step, Ticket};
use crate::grpc::Served;
use crate::metrics::Counters;
use crate::session_loop::{SessionKind, SessionNames, Sessions};
use crate::terms::{Protocol, Terms};
use crate::{Limits, ServerError, ServerOptions};

/// State every session and the handle share.
pub(crate) struct Shared {
    part: Arc<ModelPart>,
    hidden_size: usize,
    kv_bytes_per_position: u64,
    pub(crate) fingerprint: TrunkFingerprint,
    pub(crate) terms: Terms<Codec>,
    pub(crate) limits: Limits,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) kv_reserved: AtomicU64,
    pub(crate) engine: Engine,
    pub(crate) counters: Arc<Counters>,
}

/// The trunk protocol, as statuses name it.
const TRUNK: Protocol = Protocol::new("trunk", PROTOCOL_VERSION, "codec", SESSIONS);

impl Shared {
    pub(crate) fn new(
        part: ModelPart,
        fingerprint: TrunkFingerprint,
        options: &ServerOptions,
    ) -> Result<Self, ServerError> {
        let c = part.config();
        let layers = part.spec().layers.len() as u64;
        let kv_bytes_per_position =
            layers * 2 * (c.num_kv_heads * part.kv_precision().bytes_for(c.head_dim)) as u64;
        let hidden_size = c.hidden_size;
        let terms = Terms::new(TRUNK, &options.codecs, fingerprint.sha256, &fingerprint)?;
        let (limits, transport) = (&options.limits, &options.access.transport);
        let sessions = Sessions::new(TRUNK, limits.max_sessions, limits.idle_timeout, transport)?;
        let counters = sessions.counters().clone();
        let part = Arc::new(part);
        let engine = Engine::start(part.clone(), counters.clone(), options.batch_wait)
            .map_err(|e| ServerError::Config(format!("starting the trunk worker: {e}")))?;
        Ok(Self {
            part,
            hidden_size,
            kv_bytes_per_position,
            fingerprint,
            terms,
            limits: options.limits.clone(),
            sessions: Arc::new(sessions),
            kv_reserved: AtomicU64::new(0),
            engine,
            counters,
        })
    }

    /// The limits the handshake announces.
    pub(crate) fn limits_pb(&self) -> pb::Limits {
        pb::Limits {
            max_sessions: self.limits.max_sessions as u32,
            max_context: self.limits.max_context as u32,
            max_message_bytes: self.limits.max_message_bytes as u64,
            idle_timeout_ms: self.limits.idle_timeout.as_millis() as u64,
            kv_budget_bytes: self.limits.kv_budget_bytes,
            kv_precision: self.part.kv_precision().to_string(),
            trunk_device: ComputeDevice::of(self.part.device()).to_string(),
        }
    }
}

impl Served for Shared {
    type Service = pb::Trunk;
    type Session = SessionState;

    fn welcome(&self, hello: pb::HandshakeRequest) -> Result<pb::HandshakeReply, Status> {
        welcome(&self.terms, &self.fingerprint, self.limits_pb(), hello)
    }
}

/// The handshake's reply to `hello` of a service of a language-model trunk (`Trunk`, and
/// `TrainTrunk` beside it) on `terms`, announcing `fingerprint` and `limits`.
pub(crate) fn welcome(
    terms: &Terms<Codec>,
    fingerprint: &TrunkFingerprint,
    limits: pb::Limits,
    hello: pb::HandshakeRequest,
) -> Result<pb::HandshakeReply, Status> {
    let codec = |c| codec_from_pb(c).ok();
    let codec = terms.agree(hello.protocol_version, &hello.codecs, codec)?;
    Ok(pb::HandshakeReply {
        protocol_version: terms.version(),
        codec: codec_to_pb(codec) as i32,
        fingerprint: Some(fingerprint_to_pb(fingerprint)),
        limits: Some(limits),
    })
}

/// How statuses name the trunk's sessions; closing one frees its share of the KV budget.
const SESSIONS: SessionNames =
    SessionNames::new("session", "sessions", "closed and its KV cache freed");

/// One session: its trunk state (KV cache included) and what it holds of the server's limits,
/// released on drop.
pub(crate) struct SessionState {
    shared: Arc<Shared>,
    id: u64,
    codec: Option<Codec>,
    /// Present between steps; it travels to the engine during one.
    trunk: Option<Box<TrunkState>>,
    reserved: u64,
    /// Handed back with the next step (see [`Ticket`]).
    ticket: Option<Ticket>,
}

impl Drop for SessionState {
    fn drop(&mut self) {
        self.shared
            .kv_reserved
            .fetch_sub(self.reserved, Ordering::SeqCst);
    }
}

impl SessionKind for SessionState {
    type Shared = Shared;

    fn open(shared: Arc<Shared>, id: u64) -> Self {
        Self {
            shared,
            id,
            codec: None,
            trunk: None,
            reserved: 0,
            ticket: None,
        }
    }

    async fn handle(&mut self, request: SessionRequest) -> Result<SessionReply, Status> {
        let Some(kind) = request.kind else {
            return Err(Status::invalid_argument("empty session request"));
        };
        let reply = match kind {
            RequestKind::Open(open) => self.open(open)?,
            RequestKind::Step(step) => self.step(step).await?,
        };
        Ok(SessionReply { kind: Some(reply) })
    }
}

impl SessionState {
    fn open(&mut self, open: pb::Open) -> Result<ReplyKind, Status> {
        if self.codec.is_some() {
            return Err(Status::invalid_argument("the session is already open"));
        }
        let codec = codec_from_pb(open.codec).map_err(|e| e.to_string());
        let terms = &self.shared.terms;
        let codec = terms.open(open.protocol_version, codec, &open.fingerprint_sha256)?;
        let layers = self.shared.fingerprint.model_layers;
        let keys = open
            .keys
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("the session's Open carries no keys"))?;
        let keys = lsplit_proto::keys_from_pb(keys, layers)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let trunk = TrunkState::new(self.shared.part.clone(), &keys)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        self.trunk = Some(Box::new(trunk));
        self.codec = Some(codec);
        self.shared
            .counters
            .sessions_total
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = self.id, %codec, policy = %keys.policy, obfuscation = %keys.obfuscation, "session opened");
        Ok(ReplyKind::Opened(pb::Opened {
            session_id: self.id,
        }))
    }

    /// Checks rows against the session before anything runs; `position` is where they must
    /// start (the session's position, unless the step catches up). Reserves their KV cache.
    fn admit(&mut self, rows: &HiddenRows, position: usize) -> Result<(), Status> {
        let Some(codec) = self.codec else {
            return Err(Status::failed_precondition(
                "unknown session: rows arrived before the session was opened",
            ));
        };
        if rows.codec != codec {
            return Err(Status::invalid_argument(format!(
                "rows are encoded in {} but the session's codec is {codec}",
                rows.codec
            )));
        }
        if rows.width != self.shared.hidden_size {
            return Err(Status::invalid_argument(format!(
                "rows are {} values wide but the trunk's hidden size is {}",
                rows.width, self.shared.hidden_size
            )));
        }
        if rows.rows == 0 {
            return Err(Status::invalid_argument(
                "a step must carry at least one row",
            ));
        }
        if rows.start != position {
            return Err(Status::invalid_argument(format!(
                "rows start at position {} but the session is at position {}",
                rows.start, position
            )));
        }
        let end = rows.end();
        let limit = self.shared.limits.max_context;
        if end > limit {
            return Err(Status::resource_exhausted(format!(
                "the session would reach {end} positions, past this server's limit of {limit}"
            )));
        }
        self.reserve(end as u64 * self.shared.kv_bytes_per_position)?;
        self.shared
            .counters
            .bytes_in_total
            .fetch_add(rows.bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Admits one step, then runs it on the engine, which batches it with other sessions'
    /// steps when its drawn layers allow.
    async fn step(&mut self, step: pb::Step) -> Result<ReplyKind, Status> {
        let message = lsplit_proto::step_from_pb(step)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Before the session opens there is no trunk state: `admit` refuses the step.
        let expected = match &self.trunk {
            Some(trunk) => trunk.expected_start(message.rewind).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "step {} rewinds {} positions but the session holds {}",
                    message.step,
                    message.rewind,
                    trunk.position()
                ))
            })?,
            None => 0,
        };
        self.admit(&message.rows, expected)?;
        let trunk = self
            .trunk
            .take()
            .ok_or_else(|| Status::internal("session trunk lost"))?;
        let (reply, done) = oneshot::channel();
        self.shared.engine.submit(Step {
            trunk,
            message,
            reply,
            ticket: self.ticket.take(),
        })?;
        let Done {
            trunk,
            output,
            ticket,
        } = done.await.map_err(|_| self.shared.engine.lost())?;
        self.trunk = Some(trunk);
        self.ticket = ticket;
        let output = output?;
        let counters = &self.shared.counters;
        counters.steps_total.fetch_add(1, Ordering::Relaxed);
        counters
            .rows_total
            .fetch_add(output.rows.rows as u64, Ordering::Relaxed);
        counters
            .bytes_out_total
            .fetch_add(output.rows.bytes.len() as u64, Ordering::Relaxed);
        Ok(ReplyKind::Step(lsplit_proto::step_to_pb(&output)))
    }

    /// Grows this session's share of the KV budget to `bytes`, or refuses the step.
    fn reserve(&mut self, bytes: u64) -> Result<(), Status> {
        let extra = bytes.saturating_sub(self.reserved);
        let budget = self.shared.limits.kv_budget_bytes;
        let granted =
            self.shared
                .kv_reserved
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                    (held + extra <= budget).then_some(held + extra)
                });
        match granted {
            Ok(_) => {
                self.reserved += extra;
                Ok(())
            }
            Err(held) => Err(Status::resource_exhausted(format!(
                "the step needs {extra} more bytes of KV cache but the server's budget of \
                 {budget} bytes has {} left",
                budget.saturating_sub(held)
            ))),
        }
    }
}

//! The `TrainTrunk` service (`lsplit serve --training`): the trunk's forward pass and the
//! gradient of its input rows for devices fine-tuning their own layers (`lsplit finetune
//! --cloud`). Each session holds one [`DenseTrunk`] pass's layer inputs, within its budget, from
//! a `Forward` to the `Backward` that answers it; everything goes when the stream ends. It
//! computes no weight gradients and sees no tokens.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use candle_core::{Device, Tensor};
use lsplit_model::{DenseTrunk, ModelSource, TrunkActivations, TrunkFingerprint};
use lsplit_proto::pb::train_reply::Kind as ReplyKind;
use lsplit_proto::pb::train_request::Kind as RequestKind;
use lsplit_proto::pb::{self, TrainReply, TrainRequest};
use lsplit_proto::{TRAIN_PROTOCOL_VERSION, codec_from_pb, rows_from_pb, rows_to_pb};
use lsplit_wire::Codec;
use tonic::Status;

use crate::grpc::Served;
use crate::metrics::Counters;
use crate::service::welcome;
use crate::session_loop::{SessionKind, SessionNames, Sessions};
use crate::terms::{Protocol, Terms};
use crate::{Limits, ServerError, TrainingLimits, TransportLimits};

/// How statuses name training sessions; closing one frees the activations it held.
const SESSIONS: SessionNames = SessionNames::new(
    "training session",
    "training sessions",
    "closed and its activations freed",
);

/// The training protocol, as statuses name it.
const TRAIN: Protocol = Protocol::new("training", TRAIN_PROTOCOL_VERSION, "codec", SESSIONS);

/// What every training session shares.
pub(crate) struct TrainShared {
    trunk: DenseTrunk,
    hidden_size: usize,
    fingerprint: TrunkFingerprint,
    terms: Terms<Codec>,
    limits: Limits,
    /// Most positions of one training sequence.
    max_rows: usize,
    /// The limits the handshake announces: the trunk's.
    announced: pb::Limits,
    pub(crate) sessions: Arc<Sessions>,
    counters: Arc<Counters>,
}

impl TrainShared {
    /// Training over the layers of `fingerprint` of `source`, each session keeping at most
    /// `budget` bytes of layer inputs, all of them `weights` bytes of dequantized layers,
    /// offering `codecs`, within the trunk's `limits` (announced
    /// as `announced`).
    pub(crate) fn new(
        source: Arc<ModelSource>,
        fingerprint: TrunkFingerprint,
        training: TrainingLimits,
        codecs: &[Codec],
        (limits, announced): (&Limits, pb::Limits),
        transport: &TransportLimits,
    ) -> Result<Self, ServerError> {
        let hidden_size = source.config().hidden_size;
        let trunk = DenseTrunk::new(
            source,
            fingerprint.layers.clone(),
            training.activation_bytes,
        )
        .map_err(|e| ServerError::Config(e.to_string()))?
        .with_weight_cache(training.weight_bytes);
        let terms = Terms::new(TRAIN, codecs, fingerprint.sha256, &fingerprint)?;
        let sessions = Sessions::new(TRAIN, limits.max_sessions, limits.idle_timeout, transport)?;
        Ok(Self {
            trunk,
            hidden_size,
            fingerprint,
            terms,
            limits: limits.clone(),
            max_rows: training.max_rows,
            announced,
            counters: sessions.counters().clone(),
            sessions: Arc::new(sessions),
        })
    }
}

impl Served for TrainShared {
    type Service = pb::TrainTrunk;
    type Session = TrainSession;

    fn welcome(&self, hello: pb::HandshakeRequest) -> Result<pb::HandshakeReply, Status> {
        welcome(
            &self.terms,
            &self.fingerprint,
            self.announced.clone(),
            hello,
        )
    }
}

/// One training session: its codec, and the latest forward pass's index and kept inputs.
pub(crate) struct TrainSession {
    shared: Arc<TrainShared>,
    id: u64,
    codec: Option<Codec>,
    latest: Option<(u64, TrunkActivations)>,
}

impl SessionKind for TrainSession {
    type Shared = TrainShared;

    fn open(shared: Arc<TrainShared>, id: u64) -> Self {
        Self {
            shared,
            id,
            codec: None,
            latest: None,
        }
    }

    async fn handle(&mut self, request: TrainRequest) -> Result<TrainReply, Status> {
        let kind = match request.kind {
            Some(RequestKind::Open(open)) => self.open(open)?,
            Some(RequestKind::Forward(forward)) => self.forward(forward).await?,
            Some(RequestKind::Backward(backward)) => self.backward(backward).await?,
            None => return Err(Status::invalid_argument("empty training request")),
        };
        Ok(TrainReply { kind: Some(kind) })
    }
}

impl TrainSession {
    fn open(&mut self, open: pb::TrainOpen) -> Result<ReplyKind, Status> {
        if self.codec.is_some() {
            return Err(Status::invalid_argument("the session is already open"));
        }
        let codec = codec_from_pb(open.codec).map_err(|e| e.to_string());
        let codec =
            self.shared
                .terms
                .open(open.protocol_version, codec, &open.fingerprint_sha256)?;
        self.codec = Some(codec);
        self.shared
            .counters
            .sessions_total
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = self.id, %codec, "training session opened");
        Ok(ReplyKind::Opened(pb::Opened {
            session_id: self.id,
        }))
    }

    /// Decodes rows of the session's codec and the trunk's width, from position 0, within the
    /// context limit.
    fn rows(&self, rows: Option<pb::Rows>, field: &'static str) -> Result<Tensor, Status> {
        let Some(codec) = self.codec else {
            return Err(Status::failed_precondition(
                "unknown session: rows arrived before the session was opened",
            ));
        };
        let rows = rows.ok_or_else(|| Status::invalid_argument(format!("no {field} rows")))?;
        let rows = rows_from_pb(rows).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if rows.codec != codec {
            return Err(Status::invalid_argument(format!(
                "rows are encoded in {} but the session's codec is {codec}",
                rows.codec
            )));
        }
        if rows.width != self.shared.hidden_size || rows.start != 0 {
            return Err(Status::invalid_argument(format!(
                "{field} rows must be {} values wide from position 0; these are {} wide from {}",
                self.shared.hidden_size, rows.width, rows.start
            )));
        }
        let limit = self.shared.limits.max_context;
        if rows.rows > limit {
            return Err(Status::resource_exhausted(format!(
                "{} rows are past this server's limit of {limit} positions",
                rows.rows
            )));
        }
        let limit = self.shared.max_rows;
        if rows.rows > limit {
            return Err(Status::resource_exhausted(format!(
                "a training sequence of {} positions is past this server's limit of {limit} \
                 (--training-max-rows)",
                rows.rows
            )));
        }
        self.shared
            .counters
            .bytes_in_total
            .fetch_add(rows.bytes.len() as u64, Ordering::Relaxed);
        rows.decode(&Device::Cpu)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// Encodes `t` in the session's codec, counted.
    fn encode(&self, t: &Tensor) -> Result<pb::Rows, Status> {
        let codec = self.codec.ok_or_else(|| Status::internal("no codec"))?;
        let rows = codec
            .encode(t, 0)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.shared
            .counters
            .bytes_out_total
            .fetch_add(rows.bytes.len() as u64, Ordering::Relaxed);
        Ok(rows_to_pb(&rows))
    }

    async fn forward(&mut self, forward: pb::Forward) -> Result<ReplyKind, Status> {
        let x = self.rows(forward.rows, "forward")?;
        // The previous pass's inputs go before this one's are kept.
        self.latest = None;
        let shared = self.shared.clone();
        let (out, kept) = compute(move || shared.trunk.forward(&x)).await?;
        self.latest = Some((forward.pass, kept));
        self.shared
            .counters
            .steps_total
            .fetch_add(1, Ordering::Relaxed);
        Ok(ReplyKind::Forward(pb::Forward {
            pass: forward.pass,
            rows: Some(self.encode(&out)?),
        }))
    }

    async fn backward(&mut self, backward: pb::Backward) -> Result<ReplyKind, Status> {
        let grad = self.rows(backward.grad, "gradient")?;
        let (pass, kept) = match self.latest.take() {
            Some((pass, kept)) if pass == backward.pass => (pass, kept),
            _ => {
                return Err(Status::failed_precondition(format!(
                    "backward pass {} has no forward pass: a backward answers the latest forward \
                     pass, once",
                    backward.pass
                )));
            }
        };
        let shared = self.shared.clone();
        let input_grad = compute(move || shared.trunk.backward(&kept, &grad)).await?;
        Ok(ReplyKind::Backward(pb::Backward {
            pass,
            grad: Some(self.encode(&input_grad)?),
        }))
    }
}

/// Runs a trunk pass off the async runtime; a model error (a shape that does not fit) is the
/// device's.
async fn compute<T: Send + 'static>(
    work: impl FnOnce() -> lsplit_model::Result<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(move || lsplit_model::on_pool(work))
        .await
        .map_err(|e| Status::internal(format!("the training pass failed: {e}")))?
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Errors loading the device side or opening its sessions.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The options contradict each other.
    #[error("{0}")]
    Config(String),
    /// A step that failed, with what was being done.
    #[error("{context}")]
    Context {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The model could not be loaded.
    #[error(transparent)]
    Model(#[from] lsplit_model::ModelError),
    /// The split could not be set up.
    #[error(transparent)]
    Split(#[from] lsplit_split::SplitError),
    /// The split policy is not valid for this model.
    #[error(transparent)]
    Policy(#[from] lsplit_split::PolicyError),
    /// A trunk session could not be opened.
    #[error(transparent)]
    Trunk(#[from] lsplit_split::TrunkError),
    /// The trunk server could not be used.
    #[error(transparent)]
    Remote(#[from] lsplit_remote::RemoteError),
}

impl DeviceError {
    /// `source`, with what was being done when it happened.
    pub(crate) fn context(
        context: String,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Context {
            context,
            source: Box::new(source),
        }
    }
}

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Checks `authorization: Bearer <token>` on every request, in constant time.
///
/// Both tokens are hashed first so the comparison takes the same time whatever their lengths.
#[derive(Clone)]
pub(crate) struct TokenCheck {
    expected: Option<[u8; 32]>,
}

impl TokenCheck {
    pub(crate) fn new(token: Option<String>) -> Self {
        Self {
            expected: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("this server requires a bearer token"))?;
        let given: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
        if bool::from(given.ct_eq(expected)) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("the bearer token is not valid"))
        }
    }
}

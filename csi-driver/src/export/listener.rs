//! The accept loop both listeners of the front share: a bounded number of connections at once,
//! each served in its own task; an accept error (a descriptor limit, say) is logged and waited out.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Connections one listener serves at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;

/// Accepts on `listener` until the process ends, serving each connection with `serve`.
pub async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "{what}: too many connections, refusing one");
            continue;
        };
        let served = serve(tcp, peer);
        tokio::spawn(async move {
            let _slot = slot;
            served.await;
        });
    }
}

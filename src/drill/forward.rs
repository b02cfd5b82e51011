//! The relay's tasks: accept connections, dial the target, and copy each
//! direction through the faults in force.

use super::state::{Faults, Shared};
use super::Direction;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Bytes read per chunk; a delay applies to each chunk.
const CHUNK: usize = 16 * 1024;
/// Chunks queued per direction (delayed or held) before the relay stops
/// reading: 4 MiB, about what a sender's kernel buffers hold on a stalled
/// TCP connection.
const IN_FLIGHT: usize = 256;
/// Pause after a failed accept (out of file descriptors and the like).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Accepts connections until the task is dropped.
pub(super) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "relay: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Read under one borrow: a cut after this bumps `cuts`, which the
        // connection's task sees whenever it starts watching.
        let Faults { cut, cuts, .. } = *shared.faults.borrow();
        if cut {
            reset(inbound);
            continue;
        }
        let live = shared.admit();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _live = live;
            connection(inbound, shared, cuts).await;
        });
    }
}

/// Closes with RST rather than FIN: the peer sees a broken connection, as
/// when a network path fails, not an orderly close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Forwards one connection until both directions end or a cut comes.
async fn connection(mut inbound: TcpStream, shared: Arc<Shared>, cuts: u64) {
    let mut faults = shared.faults.subscribe();
    let target = shared.target();
    let cut = async move {
        let _ = faults.wait_for(|f| f.cuts != cuts).await;
    };
    tokio::pin!(cut);
    let mut outbound = tokio::select! {
        r = TcpStream::connect(target) => match r {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%target, error = %e, "relay: target refused");
                return reset(inbound);
            }
        },
        _ = &mut cut => return reset(inbound),
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let was_cut = {
        let (ri, wi) = inbound.split();
        let (ro, wo) = outbound.split();
        let both = async {
            tokio::try_join!(
                pipe(ri, wo, &shared, Direction::ToTarget),
                pipe(ro, wi, &shared, Direction::ToDialer)
            )
        };
        tokio::select! {
            _ = both => false,
            _ = &mut cut => true,
        }
    };
    if was_cut {
        reset(inbound);
        reset(outbound);
    }
}

/// Copies one direction until EOF (then half-closes the writer) or an error.
/// Reading and writing run apart, joined by a bounded queue, so a delay adds
/// latency without capping throughput and a held direction keeps its bytes.
async fn pipe<R, W>(mut from: R, mut to: W, shared: &Shared, direction: Direction) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            let due = Instant::now() + shared.delay(direction);
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        let mut faults = shared.faults.subscribe();
        while let Some((due, chunk)) = rx.recv().await {
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            released(&mut faults, direction).await?;
            // Counted before the write, so that a receiver never sees bytes
            // the counter does not include yet.
            shared.count(direction, chunk.len());
            to.write_all(&chunk).await?;
        }
        // The end of the stream is held like its bytes.
        released(&mut faults, direction).await?;
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// Waits until bytes travelling `direction` may pass.
async fn released(faults: &mut watch::Receiver<Faults>, direction: Direction) -> io::Result<()> {
    match faults.wait_for(|f| f.held != Some(direction)).await {
        Ok(_) => Ok(()),
        Err(_) => Err(io::Error::other("relay stopped")),
    }
}

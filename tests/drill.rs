//! The fault relay (`oncemesh::drill::Relay`) on its own, between two ends
//! this test holds: a client that dials the relay and the target's accepted
//! socket, so every byte, delay and reset is seen from both sides.

use oncemesh::drill::{Direction, Relay};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Longest any single read waits before the test gives up.
const PATIENCE: Duration = Duration::from_secs(10);

fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// Dials the relay and returns (client end, target end).
fn pair(relay: &Relay, target: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(relay.addr()).expect("dial the relay");
    let (server, _) = target.accept().expect("the relay dials the target");
    for s in [&client, &server] {
        s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
    }
    (client, server)
}

fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).expect("read what was sent");
    buf
}

/// What the next read on `stream` gives: bytes, end of stream, or an error kind.
fn next_read(stream: &mut TcpStream) -> Result<Vec<u8>, ErrorKind> {
    let mut buf = [0u8; 1024];
    stream
        .read(&mut buf)
        .map(|n| buf[..n].to_vec())
        .map_err(|e| e.kind())
}

/// Whether `cond` holds within `PATIENCE`.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

#[test]
fn carries_bytes_both_ways_and_counts_each_direction() {
    let target = listener();
    let relay = Relay::start(target.local_addr().unwrap()).unwrap();
    let (mut client, mut server) = pair(&relay, &target);
    assert_eq!(relay.live_connections(), 1);
    assert_eq!(relay.connections_accepted(), 1);

    let up: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    client.write_all(&up).unwrap();
    assert_eq!(read_exact(&mut server, up.len()), up);
    server
        .write_all(b"five thousand? no, twenty-seven")
        .unwrap();
    assert_eq!(
        read_exact(&mut client, 31),
        b"five thousand? no, twenty-seven"
    );
    assert_eq!(relay.bytes_toward(Direction::ToTarget), 100_000);
    assert_eq!(relay.bytes_toward(Direction::ToDialer), 31);
    assert_eq!(relay.bytes_forwarded(), 100_031);

    // An end of stream is forwarded as one: the other side reads EOF and may
    // still answer.
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(next_read(&mut server), Ok(Vec::new()));
    server.write_all(b"bye").unwrap();
    assert_eq!(read_exact(&mut client, 3), b"bye");
    drop(server);
    assert_eq!(next_read(&mut client), Ok(Vec::new()));
    assert!(eventually(|| relay.live_connections() == 0));
}

#[test]
fn a_cut_resets_live_connections_and_refuses_new_ones_until_healed() {
    let target = listener();
    let relay = Relay::start(target.local_addr().unwrap()).unwrap();
    let (mut client, mut server) = pair(&relay, &target);
    client.write_all(b"before").unwrap();
    assert_eq!(read_exact(&mut server, 6), b"before");
    assert_eq!(relay.reconnected_at(), None);

    relay.cut();
    assert!(relay.is_cut());
    assert_eq!(
        relay.live_connections(),
        0,
        "cut returns once they are gone"
    );
    assert_eq!(next_read(&mut client), Err(ErrorKind::ConnectionReset));
    assert_eq!(next_read(&mut server), Err(ErrorKind::ConnectionReset));

    // A dial while cut: the handshake completes (the relay listens), then the
    // relay resets it, and the target never sees it.
    let mut refused = TcpStream::connect(relay.addr()).unwrap();
    refused.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(next_read(&mut refused), Err(ErrorKind::ConnectionReset));
    target.set_nonblocking(true).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        target.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock)
    );
    target.set_nonblocking(false).unwrap();
    assert_eq!(relay.connections_accepted(), 1);

    let healed = Instant::now();
    relay.heal();
    assert!(!relay.is_cut());
    assert_eq!(relay.reconnected_at(), None, "nobody redialed yet");
    let (mut client, mut server) = pair(&relay, &target);
    client.write_all(b"after").unwrap();
    assert_eq!(read_exact(&mut server, 5), b"after");
    assert!(relay.reconnected_at().is_some_and(|at| at >= healed));
    assert_eq!(relay.connections_accepted(), 2);
}

#[test]
fn a_delay_applies_to_its_direction_only() {
    const DELAY: Duration = Duration::from_millis(400);
    let target = listener();
    let relay = Relay::start(target.local_addr().unwrap()).unwrap();
    let (mut client, mut server) = pair(&relay, &target);

    relay.set_delay_toward(Direction::ToTarget, DELAY);
    assert_eq!(relay.delay(Direction::ToTarget), DELAY);
    assert_eq!(relay.delay(Direction::ToDialer), Duration::ZERO);
    let sent = Instant::now();
    client.write_all(b"ping").unwrap();
    assert_eq!(read_exact(&mut server, 4), b"ping");
    let up = sent.elapsed();
    let sent = Instant::now();
    server.write_all(b"pong").unwrap();
    assert_eq!(read_exact(&mut client, 4), b"pong");
    let down = sent.elapsed();
    assert!(up >= DELAY, "toward the target: {up:?}");
    assert!(down < DELAY, "back, not delayed: {down:?}");

    relay.set_delay(DELAY);
    let sent = Instant::now();
    server.write_all(b"pong").unwrap();
    assert_eq!(read_exact(&mut client, 4), b"pong");
    assert!(
        sent.elapsed() >= DELAY,
        "both ways now: {:?}",
        sent.elapsed()
    );

    relay.set_delay(Duration::ZERO);
    let sent = Instant::now();
    client.write_all(b"ping").unwrap();
    assert_eq!(read_exact(&mut server, 4), b"ping");
    assert!(sent.elapsed() < DELAY, "removed: {:?}", sent.elapsed());
}

#[test]
fn one_way_holds_the_other_direction_until_healed_and_loses_nothing() {
    let target = listener();
    let relay = Relay::start(target.local_addr().unwrap()).unwrap();
    let (mut client, mut server) = pair(&relay, &target);

    relay.one_way(Direction::ToTarget);
    assert_eq!(relay.held(), Some(Direction::ToDialer));
    client.write_all(b"heard").unwrap();
    assert_eq!(read_exact(&mut server, 5), b"heard");
    server.write_all(b"unheard").unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let silence = next_read(&mut client);
    assert!(
        matches!(silence, Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "nothing comes back while one-way: {silence:?}"
    );
    assert_eq!(relay.bytes_toward(Direction::ToDialer), 0);
    assert_eq!(relay.live_connections(), 1, "the connection stays open");

    // A new connection is still let through, and held the same way.
    let (mut client2, mut server2) = pair(&relay, &target);
    client2.write_all(b"new").unwrap();
    assert_eq!(read_exact(&mut server2, 3), b"new");
    server2.write_all(b"held too").unwrap();

    relay.heal();
    assert_eq!(relay.held(), None);
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(read_exact(&mut client, 7), b"unheard");
    assert_eq!(
        next_read(&mut client),
        Ok(Vec::new()),
        "then its end of stream"
    );
    assert_eq!(read_exact(&mut client2, 8), b"held too");
    assert_eq!(relay.bytes_toward(Direction::ToDialer), 15);
}

#[test]
fn a_new_target_takes_new_connections_while_live_ones_keep_theirs() {
    let (first, second) = (listener(), listener());
    let relay = Relay::start(first.local_addr().unwrap()).unwrap();
    let (mut old_client, mut old_server) = pair(&relay, &first);

    relay.set_target(second.local_addr().unwrap());
    assert_eq!(relay.target(), second.local_addr().unwrap());
    let (mut new_client, mut new_server) = pair(&relay, &second);
    new_client.write_all(b"second").unwrap();
    assert_eq!(read_exact(&mut new_server, 6), b"second");
    old_client.write_all(b"first").unwrap();
    assert_eq!(read_exact(&mut old_server, 5), b"first");
}

#[test]
fn an_unreachable_target_resets_the_dialer() {
    let gone = listener().local_addr().unwrap();
    let relay = Relay::start(gone).unwrap();
    let mut client = TcpStream::connect(relay.addr()).unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(next_read(&mut client), Err(ErrorKind::ConnectionReset));
}

#[test]
fn dropping_the_relay_closes_what_it_carries() {
    let target = listener();
    let relay = Relay::start(target.local_addr().unwrap()).unwrap();
    let (mut client, mut server) = pair(&relay, &target);
    let addr = relay.addr();
    drop(relay);
    assert_eq!(next_read(&mut client), Ok(Vec::new()));
    assert_eq!(next_read(&mut server), Ok(Vec::new()));
    assert!(
        TcpStream::connect(addr).is_err(),
        "nothing listens any more"
    );
}

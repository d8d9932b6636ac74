//! Ways to listen and connect beyond a URL: a socket address, a listener the application
//! bound itself, and a Unix socket file left behind by a crashed process.

use chatter_core::{connect, listen, Address, ListenError, Options, SendOptions, Server};

/// A `SocketAddr` is a `tcp://` address for `listen` and `connect`.
#[tokio::test]
async fn a_socket_address_is_a_tcp_address() {
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = listen(any, Options::default()).await.unwrap();
    let Address::Tcp { port, .. } = server.addresses()[0] else {
        panic!("not TCP: {}", server.addresses()[0]);
    };
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let client = connect(addr, Options::default()).await.unwrap();
    let peer = server.accept().await.expect("accepted");
    client.send("hi", SendOptions::new()).await.unwrap();
    assert_eq!(
        peer.receive().await.unwrap().decode::<String>().unwrap(),
        "hi"
    );
}

/// A listener bound by the application (say, handed over by systemd) serves chatter.
#[tokio::test]
async fn a_listener_bound_by_the_application_serves_chatter() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    let server = Server::from_tcp_listener(listener, Options::default()).unwrap();
    assert_eq!(server.addresses(), [Address::from(local)]);
    let client = connect(local, Options::default()).await.unwrap();
    let peer = server.accept().await.expect("accepted");
    peer.send("hello", SendOptions::new()).await.unwrap();
    assert_eq!(
        client.receive().await.unwrap().decode::<String>().unwrap(),
        "hello"
    );

    let path = tests::unix_path();
    let unix = tokio::net::UnixListener::bind(&path).unwrap();
    let server = Server::from_unix_listener(unix, Options::default()).unwrap();
    let client = connect(format!("unix://{}", path.display()), Options::default())
        .await
        .unwrap();
    let peer = server.accept().await.expect("accepted");
    client.send(&7u32, SendOptions::new()).await.unwrap();
    assert_eq!(peer.receive().await.unwrap().decode::<u32>().unwrap(), 7);
    drop(server);
    // The application's socket file is the application's to remove.
    assert!(path.exists());
    std::fs::remove_file(&path).unwrap();
}

/// A socket file that nothing listens on (its process crashed) is replaced; one that a
/// live server holds is an error that says so.
#[tokio::test]
async fn a_stale_socket_file_is_replaced_and_a_live_one_is_not() {
    let path = tests::unix_path();
    let url = format!("unix://{}", path.display());
    // A listener that goes away without removing its file, as a crashed process does.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let server = listen(url.as_str(), Options::default()).await.unwrap();
    let client = connect(url.as_str(), Options::default()).await.unwrap();
    let peer = server.accept().await.expect("accepted");
    client.send("alive", SendOptions::new()).await.unwrap();
    assert_eq!(
        peer.receive().await.unwrap().decode::<String>().unwrap(),
        "alive"
    );

    let err = listen(url.as_str(), Options::default()).await.unwrap_err();
    assert!(matches!(err, ListenError::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("another process is listening"),
        "{err}"
    );
    // The live server kept its socket.
    drop(client);
    connect(url.as_str(), Options::default()).await.unwrap();
    drop(server);
    assert!(!path.exists(), "the server removes the file it created");
}

/// A path that holds something other than a socket is never removed.
#[tokio::test]
async fn a_file_that_is_not_a_socket_is_left_alone() {
    let path = tests::unix_path();
    std::fs::write(&path, b"precious").unwrap();
    let err = listen(format!("unix://{}", path.display()), Options::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
}

/// A burst of connections beyond the standard library's backlog of 128 waits for no SYN
/// retransmission (a second): the kernel queues them all (`Options::listen_backlog`,
/// default 1024). The server's accept loop does not run meanwhile (this thread never
/// yields to it), so every connection waits in the backlog; one beyond it would time out.
#[tokio::test]
async fn a_burst_of_connections_beyond_128_waits_in_the_backlog() {
    let system_cap: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    let burst = 300.min(system_cap.saturating_sub(10));
    if burst <= 128 {
        eprintln!("net.core.somaxconn is {system_cap}: no burst beyond 128 to try");
        return;
    }
    let server = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let Address::Tcp { port, .. } = server.addresses()[0] else {
        panic!("not TCP: {}", server.addresses()[0]);
    };
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut held = Vec::with_capacity(burst);
    for i in 0..burst {
        // A dropped SYN is retried after a second: 300 ms tells the two apart.
        let stream =
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300))
                .unwrap_or_else(|e| panic!("connection {i} of {burst} was not queued: {e}"));
        held.push(stream);
    }
    assert_eq!(held.len(), burst);
}

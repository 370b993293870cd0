use pg_outbox_tests::Proxy;
use std::io::Read;
use std::sync::atomic::Ordering;

#[test]
fn refusing_proxy_closes_new_connections() {
    let proxy = Proxy::start(5672);
    let mut ok = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1);
    proxy.refuse(true);
    proxy.cut();
    let mut buf = [0u8; 8];
    assert_eq!(ok.read(&mut buf).unwrap_or(0), 0, "cut");
    let mut refused = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    assert_eq!(refused.read(&mut buf).unwrap_or(0), 0, "refused");
    assert_eq!(proxy.refused.load(Ordering::SeqCst), 1);
}

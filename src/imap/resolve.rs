//! Before a watcher connects: the IMAP host name to addresses. One lookup per (host, port) at a
//! time, shared by every watcher of that server and kept for [`RESOLVED_FOR`], so 1,000
//! mailboxes on one server start (or reconnect after a restart) with one `getaddrinfo` on the
//! blocking pool instead of 1,000 (see [`super::connect`]).
//!
//! moka's `try_get_with` does the coalescing: concurrent callers of one key wait for the one
//! lookup in flight, and a failure is handed to them all but not kept, so the next attempt
//! looks up again. IP literals are never looked up.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures::future::BoxFuture;
use moka::future::Cache;

/// How long a resolved address list is reused: 30 s. The system resolver does not say a
/// record's TTL: this is long enough to cover a start-up or a reconnect
/// wave (reconnects are spread over 2–4 s) and short enough to follow a server that moved.
pub const RESOLVED_FOR: Duration = Duration::from_secs(30);

/// Most distinct (host, port) pairs kept at once; more hosts than this are simply looked up
/// more often.
const MAX_HOSTS: u64 = 1024;

/// Looks up `(host, port)`: the system resolver, or a stand-in in tests.
type Lookup = dyn Fn(String, u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> + Send + Sync;

/// Resolves host names for every watcher of the process.
pub(super) struct Resolver {
    cache: Cache<(String, u16), Arc<[SocketAddr]>>,
    lookup: Box<Lookup>,
}

/// The process's resolver: the system's (`getaddrinfo`, through tokio), shared by all watchers.
pub(super) static SYSTEM: LazyLock<Resolver> = LazyLock::new(|| {
    Resolver::with_lookup(|host, port| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    })
});

impl Resolver {
    /// A resolver that asks `lookup` for names it does not hold.
    fn with_lookup(
        lookup: impl Fn(String, u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            cache: Cache::builder()
                .time_to_live(RESOLVED_FOR)
                .max_capacity(MAX_HOSTS)
                .build(),
            lookup: Box::new(lookup),
        }
    }

    /// The addresses of `host` (a name or an IP literal) with `port`, in the resolver's order.
    ///
    /// # Errors
    /// The lookup failed or found no address; the message is the resolver's.
    pub(super) async fn resolve(&self, host: &str, port: u16) -> io::Result<Arc<[SocketAddr]>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Arc::from([SocketAddr::new(ip, port)]));
        }
        self.cache
            .try_get_with((host.to_owned(), port), async {
                let addresses = (self.lookup)(host.to_owned(), port).await?;
                if addresses.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{host} has no address"),
                    ));
                }
                Ok(Arc::from(addresses))
            })
            .await
            .map_err(|error: Arc<io::Error>| io::Error::new(error.kind(), error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A resolver whose lookups are counted; each answers `127.0.0.1` after yielding once, so
    /// that concurrent callers really overlap. `fail_first` makes the first lookup fail.
    fn counting(fail_first: bool) -> (Resolver, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let resolver = Resolver::with_lookup(move |_host, port| {
            let call = counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::task::yield_now().await;
                if fail_first && call == 0 {
                    return Err(io::Error::other("temporary failure in name resolution"));
                }
                Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
            })
        });
        (resolver, calls)
    }

    #[tokio::test]
    async fn concurrent_watchers_of_one_host_share_one_lookup() {
        let (resolver, calls) = counting(false);
        let all =
            futures::future::join_all((0..1000).map(|_| resolver.resolve("imap.example.com", 993)))
                .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for addresses in all {
            assert_eq!(
                &*addresses.unwrap(),
                [SocketAddr::from(([127, 0, 0, 1], 993))]
            );
        }
        // Later callers within RESOLVED_FOR reuse it too.
        resolver.resolve("imap.example.com", 993).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn each_host_and_port_is_looked_up_on_its_own() {
        let (resolver, calls) = counting(false);
        resolver.resolve("imap.example.com", 993).await.unwrap();
        resolver.resolve("imap.example.com", 143).await.unwrap();
        resolver.resolve("mail.example.org", 993).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn ip_literals_are_never_looked_up() {
        let (resolver, calls) = counting(false);
        let v4 = resolver.resolve("192.0.2.7", 143).await.unwrap();
        let v6 = resolver.resolve("::1", 993).await.unwrap();
        assert_eq!(&*v4, [SocketAddr::from(([192, 0, 2, 7], 143))]);
        assert_eq!(&*v6, ["[::1]:993".parse::<SocketAddr>().unwrap()]);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_failed_lookup_is_not_kept() {
        let (resolver, calls) = counting(true);
        let error = resolver.resolve("imap.example.com", 993).await.unwrap_err();
        assert!(error.to_string().contains("temporary failure"), "{error}");
        resolver.resolve("imap.example.com", 993).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_system_resolver_finds_localhost() {
        let addresses = SYSTEM.resolve("localhost", 143).await.unwrap();
        assert!(
            addresses
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 143)
        );
    }
}

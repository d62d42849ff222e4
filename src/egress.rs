//! The outbound address guard: token URLs must be https and must not reach loopback,
//! private, link-local or metadata addresses, checked on the URL at registration and on every
//! resolved address at connect time (DNS rebinding). `BROKER_ALLOWED_NETWORKS` lets
//! addresses in the listed ranges through (a partner behind a private link) with every other
//! rule on; `BROKER_ALLOW_INSECURE_ISSUERS` lifts the guard altogether.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use ipnet::IpNet;

use url::{Host, Url};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error("not a valid absolute URL")]
    Unparseable,
    #[error("must not contain control characters or spaces")]
    Control,
    #[error("must use https (http only with BROKER_ALLOW_INSECURE_ISSUERS=true)")]
    Scheme,
    #[error("must not carry a user name or password")]
    UserInfo,
    #[error("must not carry a fragment")]
    Fragment,
    #[error("points at a loopback, private, link-local or metadata address")]
    NonPublic,
}

/// `BROKER_ALLOWED_NETWORKS`, set once for the process at start.
static ALLOWED_NETWORKS: OnceLock<Vec<IpNet>> = OnceLock::new();

/// Sets the networks outbound calls may reach besides public addresses. Process-wide and
/// once: a later call with other networks is refused (returns false).
pub fn allow_networks(nets: Vec<IpNet>) -> bool {
    let wanted = nets.clone();
    ALLOWED_NETWORKS.get_or_init(|| nets) == &wanted
}

/// Whether `ip` is public or inside one of `nets`.
pub fn is_allowed(ip: IpAddr, nets: &[IpNet]) -> bool {
    is_public(ip) || nets.iter().any(|n| n.contains(&ip))
}

fn allowed(ip: IpAddr) -> bool {
    is_allowed(ip, ALLOWED_NETWORKS.get().map_or(&[], Vec::as_slice))
}

/// Parses and checks a token URL (or a proxy base URL).
pub fn check_token_url(raw: &str, allow_insecure: bool) -> Result<Url, GuardError> {
    if raw.len() > 2048 {
        return Err(GuardError::Unparseable);
    }
    // The URL parser drops tabs and newlines silently; the stored text would keep them (and an
    // escape sequence a terminal would run when a table shows it).
    if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(GuardError::Control);
    }
    let url = Url::parse(raw).map_err(|_| GuardError::Unparseable)?;
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure => {}
        _ => return Err(GuardError::Scheme),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(GuardError::UserInfo);
    }
    if url.fragment().is_some() {
        return Err(GuardError::Fragment);
    }
    if allow_insecure {
        return Ok(url);
    }
    let public = match url.host() {
        Some(Host::Ipv4(ip)) => allowed(IpAddr::V4(ip)),
        Some(Host::Ipv6(ip)) => allowed(IpAddr::V6(ip)),
        Some(Host::Domain(d)) => is_public_name(d),
        None => return Err(GuardError::Unparseable),
    };
    if public {
        Ok(url)
    } else {
        Err(GuardError::NonPublic)
    }
}

fn is_public_name(name: &str) -> bool {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    !(n == "localhost"
        || n.ends_with(".localhost")
        || n == "metadata"
        || n == "metadata.google.internal"
        || n.ends_with(".internal") && n.starts_with("metadata")
        || !n.contains('.'))
}

/// Whether an address is routable on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || o[0] == 0
        || o[0] >= 240
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] & 0xfe) == 18))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return is_public_v4(v4);
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || s[0..6] == [0, 0, 0, 0, 0, 0]
        // IPv4-translated (SIIT) ::ffff:0:a.b.c.d
        || s[0..5] == [0, 0, 0, 0, 0xffff] && s[5] == 0
        // Local-use NAT64 64:ff9b:1::/48: reaches whatever IPv4 network the translator serves.
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)
        // 6to4 2002::/16 and Teredo 2001::/32 carry an IPv4 address of the relay's choosing.
        || s[0] == 0x2002
        || (s[0] == 0x2001 && s[1] == 0)
        // Discard-only 100::/64, ORCHID 2001:10::/28 and 2001:20::/28.
        || s[0..4] == [0x100, 0, 0, 0]
        || (s[0] == 0x2001 && (s[1] & 0xffe0) == 0x0020)
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0010)
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        || (s[0] == 0x2001 && s[1] == 0x0db8))
}

/// A DNS resolver for the outbound client that drops every non-public address (outside
/// `BROKER_ALLOWED_NETWORKS`), so a name that resolves (or re-resolves) to an internal address
/// is never connected to.
#[derive(Debug, Default)]
pub struct PublicOnlyResolver;

type ResolveError = Box<dyn std::error::Error + Send + Sync>;

/// The addresses `host` resolves to, only the allowed ones when `guard` is on; `BlockedAddress`
/// when none is left.
async fn lookup(host: String, guard: bool) -> Result<Vec<SocketAddr>, ResolveError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
        .await?
        .filter(|a| !guard || allowed(a.ip()))
        .collect();
    if addrs.is_empty() && guard {
        return Err(Box::new(BlockedAddress));
    }
    Ok(addrs)
}

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = lookup(host, true).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The same rule for proxy mode's hyper client; `guard: false` (insecure issuers allowed)
/// resolves like the system resolver.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub guard: bool,
}

impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = ResolveError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, ResolveError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ResolveError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let (host, guard) = (name.as_str().to_owned(), self.guard);
        Box::pin(async move { lookup(host, guard).await.map(Vec::into_iter) })
    }
}

/// The error the resolver gives when a name has only non-public addresses.
#[derive(Debug, thiserror::Error)]
#[error("the token endpoint resolves only to non-public addresses")]
pub struct BlockedAddress;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_networks_let_their_ranges_through() {
        let nets: Vec<IpNet> = vec![
            "10.20.0.0/16".parse().unwrap(),
            "fd00:1::/32".parse().unwrap(),
        ];
        assert!(is_allowed("10.20.3.4".parse().unwrap(), &nets));
        assert!(is_allowed("fd00:1::5".parse().unwrap(), &nets));
        assert!(is_allowed("8.8.8.8".parse().unwrap(), &nets));
        assert!(!is_allowed("10.21.0.1".parse().unwrap(), &nets));
        assert!(!is_allowed("127.0.0.1".parse().unwrap(), &nets));
        assert!(!is_allowed("169.254.169.254".parse().unwrap(), &[]));
    }

    #[test]
    fn refuses_internal_targets() {
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "https://169.254.169.254/",
            "https://127.0.0.1/token",
            "https://localhost/token",
            "https://api.localhost/token",
            "https://[::1]/token",
            "https://2130706433/token",
            "https://127.1/token",
            "https://0x7f.1/token",
            "https://[::ffff:127.0.0.1]/token",
            "https://[::ffff:a9fe:a9fe]/",
            "https://10.0.0.1/",
            "https://172.16.5.4/",
            "https://192.168.1.1/",
            "https://100.64.0.1/",
            "https://[fd00:ec2::254]/",
            "https://[fe80::1]/",
            // IPv6 forms that embed or reach an IPv4 address.
            "https://[::ffff:0:7f00:1]/",
            "https://[64:ff9b::7f00:1]/",
            "https://[64:ff9b::a9fe:a9fe]/",
            "https://[64:ff9b:1::5db8:d822]/",
            "https://[2002:7f00:1::1]/",
            "https://[2002:5db8:d822::1]/",
            "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
            "https://[::7f00:1]/",
            "https://[100::1]/",
            "https://[2001:10::1]/",
            "https://0.0.0.0/",
            "https://metadata.google.internal/",
            "https://intranet/",
            "file:///etc/passwd",
            "http://partner.example.com/token",
            "gopher://partner.example.com/",
            "https://user:pw@partner.example.com/",
            "not a url",
        ] {
            assert!(check_token_url(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn accepts_public_https() {
        for ok in [
            "https://partner.comm100.io/oauth/token",
            "https://93.184.216.34/token",
            "https://[2606:2800:220:1:248:1893:25c8:1946]/t",
            "https://[64:ff9b::5db8:d822]/t",
        ] {
            assert!(check_token_url(ok, false).is_ok(), "{ok}");
        }
    }

    #[tokio::test]
    async fn the_resolver_drops_internal_addresses() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let result = PublicOnlyResolver.resolve(name).await;
        assert!(
            result.is_err(),
            "localhost resolves only to loopback, which is dropped"
        );
        use tower_service::Service;
        let name = || "localhost".parse().unwrap();
        let guarded = GuardedResolver { guard: true }.call(name()).await;
        assert!(guarded.unwrap_err().is::<BlockedAddress>());
        let open = GuardedResolver { guard: false }.call(name()).await.unwrap();
        assert!(open.into_iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn insecure_mode_allows_local_http_but_not_other_schemes() {
        assert!(check_token_url("http://127.0.0.1:9000/token", true).is_ok());
        assert!(check_token_url("file:///etc/passwd", true).is_err());
    }
}

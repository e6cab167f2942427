//! Lists of hosts (`MQTT_BROKER`, `DB_HOST`): one name, or several separated by commas, each
//! `host` or `host:port`, so that the service can move to another node of a cluster when the
//! one in use is gone. A host without a port takes the list's default (`MQTT_PORT`, `DB_PORT`).
//!
//! Written by hand: a list of host names with optional ports is a few lines, and the crates that
//! parse URLs want a scheme and take one host.

use std::fmt;

/// One entry of a host list as written: the port, when it names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    pub host: String,
    pub port: Option<u16>,
}

/// A parsed list (the value of `MQTT_BROKER` or `DB_HOST`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostList(pub Vec<HostEntry>);

impl HostList {
    /// Parses a list ([`parse_hosts`]).
    pub fn parse(raw: &str) -> Result<Self, String> {
        parse_hosts(raw).map(HostList)
    }

    /// Its entries with their ports, `default_port` where they name none.
    pub fn endpoints(&self, default_port: u16) -> Vec<Endpoint> {
        endpoints(&self.0, default_port)
    }
}

/// A host and the port to reach it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses `a`, `a:1884`, `a, b:1884, [::1]:1885`. An IPv6 address takes its port in brackets;
/// written bare (`::1`) it has none. Empty entries are an error (a stray comma is a typo).
pub fn parse_hosts(raw: &str) -> Result<Vec<HostEntry>, String> {
    let mut hosts = Vec::new();
    for part in raw.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(if raw.trim().is_empty() {
                "must not be empty".into()
            } else {
                format!("an empty entry in the list {raw:?} (hosts are separated by one comma)")
            });
        }
        hosts.push(parse_one(part)?);
    }
    Ok(hosts)
}

fn parse_one(part: &str) -> Result<HostEntry, String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{part:?}: the port must be a number from 1 to 65535"))
    };
    if let Some(rest) = part.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{part:?}: a '[' without its ']'"))?;
        let port = match after {
            "" => None,
            p => Some(port(p.strip_prefix(':').ok_or_else(|| {
                format!("{part:?}: expected ':port' after the ']'")
            })?)?),
        };
        return Ok(HostEntry {
            host: host.to_owned(),
            port,
        });
    }
    match part.matches(':').count() {
        0 => Ok(HostEntry {
            host: part.to_owned(),
            port: None,
        }),
        1 => {
            let (host, p) = part.split_once(':').unwrap_or((part, ""));
            if host.is_empty() {
                return Err(format!("{part:?}: a port without a host"));
            }
            Ok(HostEntry {
                host: host.to_owned(),
                port: Some(port(p)?),
            })
        }
        // An IPv6 address without a port.
        _ => Ok(HostEntry {
            host: part.to_owned(),
            port: None,
        }),
    }
}

/// The entries with their ports, `default_port` where they name none.
pub fn endpoints(entries: &[HostEntry], default_port: u16) -> Vec<Endpoint> {
    entries
        .iter()
        .map(|e| Endpoint {
            host: e.host.clone(),
            port: e.port.unwrap_or(default_port),
        })
        .collect()
}

/// The list as a person reads it: `a:1883, b:1884`.
pub fn list_text(endpoints: &[Endpoint]) -> String {
    endpoints
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(raw: &str) -> String {
        list_text(&endpoints(&parse_hosts(raw).unwrap(), 1883))
    }

    #[test]
    fn one_host_is_the_seeds_setting() {
        assert_eq!(text("localhost"), "localhost:1883");
        assert_eq!(text("mqtt.example.com"), "mqtt.example.com:1883");
    }

    #[test]
    fn a_list_with_and_without_ports() {
        assert_eq!(
            text("a, b:1884,10.0.0.3:1885"),
            "a:1883, b:1884, 10.0.0.3:1885"
        );
        assert_eq!(text("[::1]:1884,::1"), "[::1]:1884, [::1]:1883");
    }

    #[test]
    fn mistakes_are_named() {
        for (raw, says) in [
            ("", "must not be empty"),
            ("a,,b", "empty entry"),
            ("a,", "empty entry"),
            ("a:0", "port must be"),
            ("a:x", "port must be"),
            ("a:70000", "port must be"),
            (":1883", "without a host"),
            ("[::1", "without its ']'"),
            ("[::1]1883", "':port'"),
        ] {
            let e = parse_hosts(raw).unwrap_err();
            assert!(e.contains(says), "{raw:?}: {e}");
        }
    }
}

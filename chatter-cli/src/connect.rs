//! The connection options every command shares (URL, TLS, timeouts, output) and what a
//! failed connect means in words a user can act on.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use chatter_rpc::chatter_core::{CloseCause, ConnectError, ProtocolError};
use chatter_rpc::{Address, Options, Peer, PeerOptions};
use clap::Args;

use crate::error::CliError;

/// Where to connect and how.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConnectArgs {
    /// The peer: tcp://HOST:PORT, tls://HOST:PORT or unix:///PATH.
    pub(crate) url: String,
    /// TLS: the CA certificate(s) that signed the server's certificate (PEM file).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// TLS: present this client certificate chain (PEM file; with --key) to a server that
    /// asks for one (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub(crate) cert: Option<PathBuf>,
    /// TLS: the private key of --cert (PEM file).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub(crate) key: Option<PathBuf>,
    /// TLS: the name to verify in the server's certificate (default: the URL's host).
    #[arg(long, value_name = "NAME")]
    pub(crate) server_name: Option<String>,
    /// TLS: accept any server certificate. Insecure (anyone on the path can impersonate
    /// the server): for tests only.
    #[arg(long, conflicts_with = "ca")]
    pub(crate) insecure: bool,
    /// How long connecting and the handshake may take: 5s, 500ms.
    #[arg(long, value_name = "TIME", default_value = "5s", value_parser = parse_duration)]
    pub(crate) connect_timeout: Duration,
    /// Print one JSON value per line, also on a terminal.
    #[arg(long)]
    pub(crate) json: bool,
    /// Print for a person (tables, pretty JSON), also when piped.
    #[arg(long, conflicts_with = "json")]
    pub(crate) pretty: bool,
}

impl ConnectArgs {
    /// Whether output is JSON lines: asked for, or stdout is not a terminal (and
    /// `--pretty` was not asked for).
    pub(crate) fn json_output(&self) -> bool {
        self.json || (!self.pretty && !std::io::stdout().is_terminal())
    }

    /// Connects and wraps the connection in a peer that serves nothing.
    pub(crate) async fn peer(&self, acknowledged_signals: bool) -> Result<Peer, CliError> {
        let (address, options) = self.target()?;
        let connection = chatter_rpc::connect(&address, options)
            .await
            .map_err(|e| self.connect_failed(&address, e))?;
        let peer_options = PeerOptions::default()
            .introspection(false)
            .acknowledged_signals(acknowledged_signals);
        Ok(Peer::with_options(connection, peer_options))
    }

    /// The URL as an address, and the connection's options (timeouts, TLS): what
    /// [`peer`](Self::peer) connects with, for commands that connect another way (the
    /// broker's client).
    pub(crate) fn target(&self) -> Result<(Address, Options), CliError> {
        let address: Address = self.url.parse().map_err(|e| {
            CliError::new(format!("{e}")).hint(
                "URLs look like tcp://127.0.0.1:7000, tls://host:7443 or unix:///run/app.sock",
            )
        })?;
        let options = Options::default()
            .connect_timeout(self.connect_timeout)
            .handshake_timeout(self.connect_timeout);
        let options = self.tls(&address, options)?;
        Ok((address, options))
    }

    #[cfg(feature = "tls")]
    fn tls(&self, address: &Address, options: Options) -> Result<Options, CliError> {
        use chatter_rpc::tls::ClientTls;
        let wants_tls =
            self.ca.is_some() || self.cert.is_some() || self.server_name.is_some() || self.insecure;
        if !matches!(address, Address::Tls { .. }) {
            if wants_tls {
                return Err(CliError::new(format!(
                    "TLS options given for {address}, which is not a tls:// URL"
                ))
                .hint("connect with tls://HOST:PORT, or leave out the TLS options"));
            }
            return Ok(options);
        }
        let client = match (&self.ca, self.insecure) {
            (Some(ca), _) => ClientTls::from_ca_pem_file(ca).map_err(|e| {
                CliError::new(format!("cannot use --ca {}: {e}", ca.display()))
            })?,
            (None, true) => ClientTls::insecure_skip_server_verification(),
            (None, false) => {
                return Err(CliError::new(format!(
                    "{address} needs to know whom to trust"
                ))
                .hint("pass --ca FILE (the CA certificate that signed the server's certificate, PEM), or --insecure for a test server"))
            }
        };
        let client = match &self.server_name {
            Some(name) => client.server_name(name),
            None => client,
        };
        let client = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => client
                .client_certificate_pem_files(cert, key)
                .map_err(|e| CliError::new(format!("cannot use --cert/--key: {e}")))?,
            _ => client,
        };
        Ok(options.tls_client(client))
    }

    #[cfg(not(feature = "tls"))]
    fn tls(&self, address: &Address, options: Options) -> Result<Options, CliError> {
        if matches!(address, Address::Tls { .. }) || self.ca.is_some() || self.cert.is_some() {
            return Err(CliError::new(
                "this build of chatter has no TLS: rebuild chatter-cli with its `tls` feature",
            ));
        }
        Ok(options)
    }

    /// A failed connect, said so that the user knows what to do.
    pub(crate) fn connect_failed(&self, address: &Address, error: ConnectError) -> CliError {
        let tls = matches!(address, Address::Tls { .. });
        match &error {
            ConnectError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                CliError::new(format!(
                    "connection refused by {address}: nothing listens there"
                ))
                .hint("is the server running, and are the host and port right?")
            }
            ConnectError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                CliError::new(format!("no socket at {address}"))
                    .hint("is the server running, and is the path right?")
            }
            ConnectError::Timeout { .. } => CliError::new(format!(
                "connecting to {address} took longer than {:?}",
                self.connect_timeout
            ))
            .hint("is the host reachable (firewall, address)? --connect-timeout waits longer"),
            ConnectError::Handshake { cause, .. } => match cause {
                CloseCause::Protocol(ProtocolError::NotChatter { .. }) => CliError::new(format!(
                    "{address} is not a chatter server: {cause}"
                ))
                .hint(if tls {
                    "check the port"
                } else {
                    "check the port; if the server uses TLS, connect with tls://"
                }),
                CloseCause::Protocol(ProtocolError::HandshakeTimeout) => CliError::new(format!(
                    "{address} accepted the connection but did not speak chatter within {:?}",
                    self.connect_timeout
                ))
                .hint(if tls {
                    "is it a chatter server, on this port?"
                } else {
                    "is it a chatter server? If it uses TLS, connect with tls://"
                }),
                CloseCause::Tls(why) => {
                    CliError::new(format!("TLS handshake with {address} failed: {why}"))
                        .hint(
                            "check --ca (the CA that signed the server's certificate), \
                             --server-name (a name in that certificate), and --cert/--key if \
                             the server requires a client certificate",
                        )
                        .hint("if the server does not use TLS, connect with tcp://")
                }
                _ if !tls => CliError::new(format!("{error}"))
                    .hint("is it a chatter server? If it uses TLS, connect with tls://"),
                _ => CliError::new(format!("{error}")),
            },
            _ => CliError::new(format!("{error}")),
        }
    }
}

/// `500ms`, `30s`, `2m`, `1h`, or a number of seconds (`1.5`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write 500ms, 30s, 2m or 1h"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown unit {other:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}

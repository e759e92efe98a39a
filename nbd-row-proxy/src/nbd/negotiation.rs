//! The option haggling phase as a sans-I/O state machine: one option in, replies out.

use std::sync::Arc;

use nbd_proto::consts::*;
use nbd_proto::option::{InfoRequest, InvalidOption, MetaContextRequest};
use nbd_proto::{ClientOption, ExportNameReply, InfoReply, OptionReply, OptionReplyKind, RawOption};

use super::export::{Catalog, Export, MAX_REQUEST_LEN, PREFERRED_BLOCK_SIZE};

/// Context id of `base:allocation` on every connection.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the transmission phase needs to know from negotiation.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// The selected export.
    pub export: Arc<Export>,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Whether `base:allocation` was selected for `NBD_CMD_BLOCK_STATUS`.
    pub base_allocation: bool,
    /// Alignment enforced on requests (1 when the client did not ask for block sizes).
    pub alignment: u32,
}

/// What to do after an option has been handled.
#[derive(Debug)]
pub enum Step {
    /// Send the bytes and read the next option.
    Continue(Vec<u8>),
    /// Send the bytes (STARTTLS's acknowledgement), run the TLS handshake, then read the next
    /// option over TLS.
    StartTls(Vec<u8>),
    /// Send the bytes, then close the connection.
    Close(Vec<u8>),
    /// Send the bytes, then enter transmission.
    Transmission(Vec<u8>, Negotiated),
}

/// Where TLS is on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// Not offered (a Unix socket, or no credentials).
    Off,
    /// Required: only STARTTLS (and ABORT) before it.
    Required,
    /// Negotiated.
    On,
}

/// Negotiation state of one connection.
#[derive(Debug)]
pub struct Negotiation {
    catalog: Catalog,
    no_zeroes: bool,
    tls: Tls,
    structured: bool,
    /// Export name the meta contexts were set for, and whether `base:allocation` was selected.
    meta: Option<(String, bool)>,
}

impl Negotiation {
    /// Starts negotiation once the client flags are known; with `tls_required`, every option
    /// but STARTTLS and ABORT is refused (`NBD_REP_ERR_TLS_REQD`) until TLS is on.
    pub fn new(catalog: Catalog, no_zeroes: bool, tls_required: bool) -> Self {
        let tls = if tls_required { Tls::Required } else { Tls::Off };
        Self { catalog, no_zeroes, tls, structured: false, meta: None }
    }

    /// Handles one framed option.
    pub fn on_option(&mut self, raw: &RawOption) -> Step {
        let mut out = Vec::new();
        let option = match ClientOption::parse(raw) {
            Ok(option) => option,
            Err(InvalidOption(why)) => {
                OptionReply::error(raw.option, NBD_REP_ERR_INVALID, why).encode(&mut out);
                return Step::Continue(out);
            }
        };
        if self.tls == Tls::Required {
            return self.before_tls(option, out);
        }
        let code = option.code();
        match option {
            ClientOption::ExportName(name) => match self.catalog.find(&name) {
                Some(export) => {
                    ExportNameReply { size: export.size(), transmission_flags: export.transmission_flags() }
                        .encode(self.no_zeroes, &mut out);
                    let session = self.session(export, false);
                    Step::Transmission(out, session)
                }
                // EXPORT_NAME has no way to report an error: the spec says close.
                None => Step::Close(out),
            },
            ClientOption::Abort => {
                OptionReply::ack(code).encode(&mut out);
                Step::Close(out)
            }
            ClientOption::List => {
                for export in self.catalog.all() {
                    OptionReply {
                        option: code,
                        kind: OptionReplyKind::Server {
                            name: export.name.clone(),
                            details: export.description.clone(),
                        },
                    }
                    .encode(&mut out);
                }
                OptionReply::ack(code).encode(&mut out);
                Step::Continue(out)
            }
            ClientOption::Info(req) | ClientOption::Go(req) => self.info_or_go(code, req, out),
            ClientOption::StructuredReply => {
                if self.structured {
                    OptionReply::error(code, NBD_REP_ERR_INVALID, "structured replies already negotiated")
                        .encode(&mut out);
                } else {
                    self.structured = true;
                    OptionReply::ack(code).encode(&mut out);
                }
                Step::Continue(out)
            }
            ClientOption::ListMetaContext(req) => {
                self.meta_context(code, req, false, &mut out);
                Step::Continue(out)
            }
            ClientOption::SetMetaContext(req) => {
                self.meta_context(code, req, true, &mut out);
                Step::Continue(out)
            }
            ClientOption::StartTls if self.tls == Tls::On => {
                OptionReply::error(code, NBD_REP_ERR_INVALID, "TLS is already on").encode(&mut out);
                Step::Continue(out)
            }
            ClientOption::StartTls => {
                OptionReply::error(code, NBD_REP_ERR_UNSUP, "TLS is offered on TCP exports started with --tls-creds")
                    .encode(&mut out);
                Step::Continue(out)
            }
            ClientOption::ExtendedHeaders | ClientOption::Unknown(_) => {
                OptionReply::error(code, NBD_REP_ERR_UNSUP, "option not supported").encode(&mut out);
                Step::Continue(out)
            }
        }
    }

    /// An option while the export still requires STARTTLS: only that or ABORT is taken.
    fn before_tls(&mut self, option: ClientOption, mut out: Vec<u8>) -> Step {
        let code = option.code();
        match option {
            ClientOption::StartTls => {
                self.tls = Tls::On;
                OptionReply::ack(code).encode(&mut out);
                Step::StartTls(out)
            }
            ClientOption::Abort => {
                OptionReply::ack(code).encode(&mut out);
                Step::Close(out)
            }
            // EXPORT_NAME cannot carry an error: the spec says close.
            ClientOption::ExportName(_) => Step::Close(out),
            _ => {
                OptionReply::error(code, NBD_REP_ERR_TLS_REQD, "this export requires TLS: NBD_OPT_STARTTLS first")
                    .encode(&mut out);
                Step::Continue(out)
            }
        }
    }

    fn session(&self, export: Arc<Export>, block_size_requested: bool) -> Negotiated {
        let base_allocation =
            matches!(&self.meta, Some((name, true)) if self.catalog.find(name).is_some_and(|e| e.name == export.name));
        Negotiated {
            alignment: if block_size_requested { export.min_block_size() } else { 1 },
            export,
            structured: self.structured,
            base_allocation,
        }
    }

    fn info_or_go(&mut self, code: u32, req: InfoRequest, mut out: Vec<u8>) -> Step {
        let Some(export) = self.catalog.find(&req.export) else {
            // Ordinary for a client that probes; a misconfigured QEMU shows up here too.
            tracing::debug!(export = ?req.export, "a client asked for an export that is not served");
            OptionReply::error(code, NBD_REP_ERR_UNKNOWN, format!("no export named {:?}", req.export)).encode(&mut out);
            return Step::Continue(out);
        };
        let info = |info| OptionReply { option: code, kind: OptionReplyKind::Info(info) };
        info(InfoReply::Export { size: export.size(), transmission_flags: export.transmission_flags() })
            .encode(&mut out);
        let mut block_size_requested = false;
        for item in &req.requests {
            match *item {
                NBD_INFO_NAME => info(InfoReply::Name(export.name.clone())).encode(&mut out),
                NBD_INFO_DESCRIPTION => info(InfoReply::Description(export.description.clone())).encode(&mut out),
                NBD_INFO_BLOCK_SIZE => block_size_requested = true,
                _ => {}
            }
        }
        // Block sizes are sent either way (the spec allows it); they are enforced only for
        // clients that asked, so older clients keep byte-granular access.
        info(InfoReply::BlockSize {
            minimum: export.min_block_size(),
            preferred: PREFERRED_BLOCK_SIZE,
            maximum: MAX_REQUEST_LEN,
        })
        .encode(&mut out);
        OptionReply::ack(code).encode(&mut out);
        if code == NBD_OPT_GO {
            let session = self.session(export, block_size_requested);
            Step::Transmission(out, session)
        } else {
            Step::Continue(out)
        }
    }

    fn meta_context(&mut self, code: u32, req: MetaContextRequest, set: bool, out: &mut Vec<u8>) {
        if set && !self.structured {
            OptionReply::error(code, NBD_REP_ERR_INVALID, "structured replies must be negotiated first").encode(out);
            return;
        }
        if self.catalog.find(&req.export).is_none() {
            OptionReply::error(code, NBD_REP_ERR_UNKNOWN, format!("no export named {:?}", req.export)).encode(out);
            return;
        }
        let matches = |q: &str| {
            if set {
                q == BASE_ALLOCATION
            } else {
                q == BASE_ALLOCATION || q == "base:"
            }
        };
        let selected = if req.queries.is_empty() { !set } else { req.queries.iter().any(|q| matches(q)) };
        if selected {
            OptionReply {
                option: code,
                kind: OptionReplyKind::MetaContext { id: BASE_ALLOCATION_ID, name: BASE_ALLOCATION.into() },
            }
            .encode(out);
        }
        if set {
            self.meta = Some((req.export, selected));
        }
        OptionReply::ack(code).encode(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let disk = Arc::new(row_store::Disk::open(&path, row_store::DiskOptions::default()).unwrap());
        let gate = crate::ownership::Gate::new(crate::ownership::Access::Open);
        let live = Arc::new(crate::ownership::Guarded::new(
            disk.clone(),
            gate,
            std::sync::Arc::new(crate::migration::residual::Postcopy::default()),
        ));
        (dir, Catalog::new("vm1".into(), disk, live, None))
    }

    fn replies(mut bytes: &[u8]) -> Vec<OptionReply> {
        let mut out = Vec::new();
        while let Some((r, n)) = OptionReply::decode(bytes).unwrap() {
            out.push(r);
            bytes = &bytes[n..];
        }
        assert!(bytes.is_empty());
        out
    }

    fn raw(opt: ClientOption) -> RawOption {
        let mut b = Vec::new();
        opt.encode(&mut b);
        RawOption::decode(&b).unwrap().unwrap().0
    }

    #[test]
    fn go_with_meta_context_and_block_size() {
        let (_d, cat) = catalog();
        let mut n = Negotiation::new(cat, true, false);
        let Step::Continue(b) = n.on_option(&raw(ClientOption::StructuredReply)) else { panic!() };
        assert_eq!(replies(&b), vec![OptionReply::ack(NBD_OPT_STRUCTURED_REPLY)]);
        let meta = MetaContextRequest {
            export: "".into(),
            queries: vec![BASE_ALLOCATION.into(), "qemu:dirty-bitmap:x".into()],
        };
        let Step::Continue(b) = n.on_option(&raw(ClientOption::SetMetaContext(meta))) else { panic!() };
        let r = replies(&b);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].kind, OptionReplyKind::MetaContext { id: 1, name: BASE_ALLOCATION.into() });
        let go = InfoRequest { export: "".into(), requests: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME] };
        let Step::Transmission(b, s) = n.on_option(&raw(ClientOption::Go(go))) else { panic!() };
        let r = replies(&b);
        assert!(matches!(r[0].kind, OptionReplyKind::Info(InfoReply::Export { size: 1048576, .. })));
        assert!(
            r.contains(&OptionReply { option: NBD_OPT_GO, kind: OptionReplyKind::Info(InfoReply::Name("vm1".into())) })
        );
        assert_eq!(r.last().unwrap(), &OptionReply::ack(NBD_OPT_GO));
        assert!(s.structured && s.base_allocation);
        assert_eq!(s.alignment, 512);
    }

    #[test]
    fn unknown_options_and_exports_keep_the_session() {
        let (_d, cat) = catalog();
        let mut n = Negotiation::new(cat, false, false);
        let Step::Continue(b) = n.on_option(&raw(ClientOption::Unknown(200))) else { panic!() };
        assert!(matches!(replies(&b)[0].kind, OptionReplyKind::Error { code: NBD_REP_ERR_UNSUP, .. }));
        let go = InfoRequest { export: "nope".into(), requests: vec![] };
        let Step::Continue(b) = n.on_option(&raw(ClientOption::Go(go))) else { panic!() };
        assert!(matches!(replies(&b)[0].kind, OptionReplyKind::Error { code: NBD_REP_ERR_UNKNOWN, .. }));
        // SET_META_CONTEXT before structured replies is invalid.
        let meta = MetaContextRequest { export: "".into(), queries: vec![BASE_ALLOCATION.into()] };
        let Step::Continue(b) = n.on_option(&raw(ClientOption::SetMetaContext(meta))) else { panic!() };
        assert!(matches!(replies(&b)[0].kind, OptionReplyKind::Error { code: NBD_REP_ERR_INVALID, .. }));
        let Step::Continue(b) = n.on_option(&raw(ClientOption::List)) else { panic!() };
        assert_eq!(replies(&b).len(), 2);
        let Step::Close(b) = n.on_option(&raw(ClientOption::Abort)) else { panic!() };
        assert_eq!(replies(&b), vec![OptionReply::ack(NBD_OPT_ABORT)]);
    }

    #[test]
    fn export_name_fallback() {
        let (_d, cat) = catalog();
        let mut n = Negotiation::new(cat.clone(), false, false);
        let Step::Transmission(b, s) = n.on_option(&raw(ClientOption::ExportName("vm1".into()))) else { panic!() };
        assert_eq!(b.len(), 134);
        assert!(!s.structured && s.alignment == 1);
        let mut n = Negotiation::new(cat, true, false);
        assert!(matches!(n.on_option(&raw(ClientOption::ExportName("other".into()))), Step::Close(_)));
    }

    #[test]
    fn tls_comes_first_when_required_and_only_once() {
        let (_d, cat) = catalog();
        let mut n = Negotiation::new(cat.clone(), true, true);
        for opt in [
            ClientOption::List,
            ClientOption::StructuredReply,
            ClientOption::Go(InfoRequest { export: "".into(), requests: vec![] }),
        ] {
            let Step::Continue(b) = n.on_option(&raw(opt)) else { panic!() };
            assert!(matches!(replies(&b)[0].kind, OptionReplyKind::Error { code: NBD_REP_ERR_TLS_REQD, .. }));
        }
        assert!(matches!(n.on_option(&raw(ClientOption::ExportName("vm1".into()))), Step::Close(_)));
        let mut n = Negotiation::new(cat.clone(), true, true);
        let Step::StartTls(b) = n.on_option(&raw(ClientOption::StartTls)) else { panic!() };
        assert_eq!(replies(&b), vec![OptionReply::ack(NBD_OPT_STARTTLS)]);
        let Step::Continue(b) = n.on_option(&raw(ClientOption::StartTls)) else { panic!() };
        assert!(matches!(replies(&b)[0].kind, OptionReplyKind::Error { code: NBD_REP_ERR_INVALID, .. }));
        let go = InfoRequest { export: "".into(), requests: vec![] };
        assert!(matches!(n.on_option(&raw(ClientOption::Go(go))), Step::Transmission(..)));
        // Without TLS configured, STARTTLS is unsupported and nothing else changes.
        let mut n = Negotiation::new(cat, true, false);
        let Step::Continue(b) = n.on_option(&raw(ClientOption::StartTls)) else { panic!() };
        assert!(matches!(replies(&b)[0].kind, OptionReplyKind::Error { code: NBD_REP_ERR_UNSUP, .. }));
    }

    #[test]
    fn list_meta_context_lists_base_allocation() {
        let (_d, cat) = catalog();
        let mut n = Negotiation::new(cat, false, false);
        for queries in [vec![], vec!["base:".to_string()]] {
            let req = MetaContextRequest { export: "vm1".into(), queries };
            let Step::Continue(b) = n.on_option(&raw(ClientOption::ListMetaContext(req))) else { panic!() };
            let r = replies(&b);
            assert_eq!(r.len(), 2);
            assert!(matches!(&r[0].kind, OptionReplyKind::MetaContext { name, .. } if name == BASE_ALLOCATION));
        }
    }
}

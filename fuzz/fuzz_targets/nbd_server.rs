//! The NBD server itself: whatever a client sends (handshake, options, requests, payloads) goes
//! through the real connection code against an in-memory disk, with and without TLS required.
//! It must never panic or hang, and it always greets first.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nbd_row_proxy::harness::{nbd_exchange, Lab};
use row_store::MemDisk;
use tokio_rustls::TlsAcceptor;

fn setup() -> &'static (Lab, TlsAcceptor) {
    static SETUP: OnceLock<(Lab, TlsAcceptor)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let lab = fuzz::lab(
            "nbd",
            1 << 20,
            &["serve", "--image", "{image}", "--socket", "{dir}/nbd.sock", "--export", "vm1"],
        );
        let pki = fuzz::scratch().join("pki");
        nbd_row_proxy::tls::make_lab_pki(&pki, &["localhost".to_string()]).unwrap();
        let tls = nbd_row_proxy::tls::TlsCreds::load(&pki).unwrap().acceptor().unwrap();
        (lab, tls)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else { return };
    let (lab, tls) = setup();
    // Bit 0: a read-only disk; bit 1: TLS required; bits 2..: the disk's size in sectors - 1.
    let size = (usize::from(mode >> 2) + 1) * 512 + usize::from(mode & 0x80 != 0) * 100;
    let disk = Arc::new(MemDisk::new(size, mode & 1 == 0));
    let catalog = lab.catalog_over(disk);
    let tls = (mode & 2 != 0).then(|| tls.clone());
    let out = fuzz::runtime().block_on(nbd_exchange(catalog, tls, input));
    assert!(out.starts_with(b"NBDMAGIC"), "the server did not greet");
});

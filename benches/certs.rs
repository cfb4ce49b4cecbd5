//! The cost of one upstream client certificate: what the `issued` credential source does at
//! every renewal (a fresh P-256 key pair, signed by the issuing CA with rcgen, PEM), and that
//! plus loading it for rustls (parse, pair check, validity), which is what a rotation costs.
//!
//! `cargo bench --bench certs -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::tls::pki::{CertAuthority, LeafSpec, Usage};
use portcullis::upstream::ClientCredential;

fn spec() -> LeafSpec {
    let mut spec = LeafSpec::new("portcullis", Usage::Client, Duration::from_secs(3600));
    spec.uris.push("spiffe://corp.example/portcullis".into());
    spec
}

fn issuing(c: &mut Criterion) {
    let ca = CertAuthority::generate("issuing CA", Duration::from_secs(24 * 3600)).expect("CA");
    let mut group = c.benchmark_group("upstream_client_certificate");
    group.bench_function("issue", |b| {
        b.iter(|| black_box(ca.issue(black_box(&spec())).expect("issue")))
    });
    group.bench_function("issue_and_load", |b| {
        b.iter(|| {
            let issued = ca.issue(black_box(&spec())).expect("issue");
            black_box(
                ClientCredential::from_pem(
                    issued.cert_pem.as_bytes(),
                    issued.key_pem.as_bytes(),
                    None,
                )
                .expect("load"),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, issuing);
criterion_main!(benches);

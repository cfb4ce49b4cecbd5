//! The cost of one authorization decision: a realistic policy set (groups, patterns, many
//! namespaces), for allowed and denied calls.
//!
//! `cargo bench --bench authz -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::authz::{AccessLevel, PolicyDocument, PolicySet};
use portcullis::schema::Scope;

fn policy_set() -> PolicySet {
    let mut text = String::from(
        "[groups]\nauditors = [\"email:alice@corp.example\", \"email:bob@corp.example\", \"spiffe://corp.example/audit/*\"]\n\
         [system]\nreaders = [\"group:auditors\"]\nadmins = [\"spiffe://corp.example/platform/*\"]\n",
    );
    // 200 namespaces, each with a few grants, like a shared service in a large company.
    for i in 0..200 {
        text.push_str(&format!(
            "[[namespaces]]\nname = \"ns-{i}\"\nreaders = [\"group:auditors\", \"cn:reader-{i}\"]\n\
             writers = [\"spiffe://corp.example/ns/ns-{i}/*\"]\nadmins = [\"cn:admin-{i}\"]\n"
        ));
    }
    let document: PolicyDocument = toml::from_str(&text).expect("policy");
    PolicySet::compile(&document).expect("compile")
}

fn decisions(c: &mut Criterion) {
    let set = policy_set();
    let mut group = c.benchmark_group("authz_decide");
    group.bench_function("writer_allowed_by_pattern", |b| {
        b.iter(|| {
            black_box(set.decide(
                black_box("spiffe://corp.example/ns/ns-150/worker-3"),
                Scope::Namespace,
                Some(black_box("ns-150")),
                AccessLevel::Write,
            ))
        })
    });
    group.bench_function("reader_via_group", |b| {
        b.iter(|| {
            black_box(set.decide(
                black_box("spiffe://corp.example/audit/job-9"),
                Scope::Namespace,
                Some(black_box("ns-7")),
                AccessLevel::Read,
            ))
        })
    });
    group.bench_function("stranger_denied", |b| {
        b.iter(|| {
            black_box(set.decide(
                black_box("spiffe://elsewhere.example/x"),
                Scope::Namespace,
                Some(black_box("ns-99")),
                AccessLevel::Write,
            ))
        })
    });
    group.bench_function("cluster_admin", |b| {
        b.iter(|| {
            black_box(set.decide(
                black_box("spiffe://corp.example/platform/ops"),
                Scope::Cluster,
                None,
                AccessLevel::Admin,
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);

//! Policy decision: one request against policies of growing size. Every request is decided
//! (list, stat, open), never every chunk.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use certs::SpiffeId;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use libtransport::policy::{Access, Action, Authorizer, Policy};
use libtransport::proto::{DatasetName, ObjectPath};

/// `n` allow rules for other teams, then the rule that matters and a class deny rule.
fn policy(n: usize) -> Policy {
    let mut text = String::from("[[dataset]]\nname = \"ct-*\"\nclass = \"phi\"\n");
    for i in 0..n {
        text.push_str(&format!(
            "[[rule]]\nname = \"team {i}\"\nsubjects = [\"spiffe://hospital.example/team-{i}/*\"]\ndatasets = [\"set-{i}-*\"]\nobjects = [\"train/**\"]\nactions = [\"read\", \"list\"]\n"
        ));
    }
    text.push_str(
        "[[rule]]\nname = \"loaders\"\nsubjects = [\"spiffe://hospital.example/gpu/*\"]\ndatasets = [\"ct-*\"]\nobjects = [\"train/**\"]\nactions = [\"read\"]\n\
         [[rule]]\nname = \"phi\"\neffect = \"deny\"\nsubjects = [\"*\"]\nexcept = [\"spiffe://hospital.example/gpu/*\"]\nclasses = [\"phi\"]\ndatasets = [\"*\"]\nactions = [\"read\", \"list\", \"write\"]\n",
    );
    Policy::parse(&text).unwrap()
}

fn bench(c: &mut Criterion) {
    let peer = SpiffeId::parse("spiffe://hospital.example/gpu/loader-3").unwrap();
    let dataset = DatasetName::new("ct-head").unwrap();
    let object = ObjectPath::new("train/2026/11/scan-000123.dcm").unwrap();
    let access = Access {
        peer: &peer,
        action: Action::Read,
        dataset: &dataset,
        object: Some(&object),
    };
    let mut g = c.benchmark_group("policy_decide");
    g.throughput(Throughput::Elements(1));
    for n in [0usize, 10, 100] {
        let p = policy(n);
        assert!(p.decide(&access).is_allow());
        g.bench_with_input(BenchmarkId::from_parameter(n + 2), &p, |b, p| {
            b.iter(|| p.decide(&access))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The policy engine and its file format: allow, deny, precedence, data classes, object
//! scopes, subjects, explanations, and errors that name their line.

use certs::SpiffeId;

use super::*;

const POLICY: &str = r#"
[[dataset]]
name = "ct-*"
class = "phi"

[[dataset]]
name = "ct-deid"
class = "deidentified"

[[dataset]]
name = "imagenet"
class = "public"

[[rule]]
name = "loaders read training scans"
subjects = ["spiffe://hospital.example/gpu/*"]
datasets = ["ct-*", "imagenet"]
objects = ["train/**"]
actions = ["read"]

[[rule]]
name = "loaders list"
subjects = ["spiffe://hospital.example/gpu/*"]
datasets = ["*"]
actions = ["list"]

[[rule]]
name = "PHI stays with the PHI trainers"
effect = "deny"
subjects = ["*"]
except = ["spiffe://hospital.example/gpu/phi/*"]
classes = ["phi"]
datasets = ["*"]
actions = ["list", "read", "write"]

[[rule]]
name = "trainer writes checkpoints"
subjects = ["spiffe://hospital.example/gpu/phi/trainer-0"]
datasets = ["checkpoints"]
actions = ["read", "write", "list"]

[[rule]]
name = "nobody overwrites the golden checkpoint"
effect = "deny"
subjects = ["*"]
datasets = ["checkpoints"]
objects = ["golden/*"]
actions = ["write"]
"#;

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn ds(s: &str) -> DatasetName {
    DatasetName::new(s).unwrap()
}

fn decide(p: &Policy, peer: &str, action: Action, dataset: &str, object: Option<&str>) -> Decision {
    let peer = id(peer);
    let dataset = ds(dataset);
    let object = object.map(|o| ObjectPath::new(o).unwrap());
    p.decide(&Access {
        peer: &peer,
        action,
        dataset: &dataset,
        object: object.as_ref(),
    })
}

fn rule_of(d: &Decision) -> Option<&str> {
    match d {
        Decision::Allow { rule } => Some(rule),
        Decision::Emergency { grant, .. } => Some(grant),
        Decision::Deny { rule, .. } => rule.as_deref(),
    }
}

const LOADER: &str = "spiffe://hospital.example/gpu/loader-1";
const PHI_LOADER: &str = "spiffe://hospital.example/gpu/phi/loader-2";
const TRAINER: &str = "spiffe://hospital.example/gpu/phi/trainer-0";

#[test]
fn allow_rules_allow_what_they_name_and_nothing_else() {
    let p = Policy::parse(POLICY).unwrap();
    let d = decide(
        &p,
        LOADER,
        Action::Read,
        "imagenet",
        Some("train/cat/1.jpg"),
    );
    assert_eq!(rule_of(&d), Some("loaders read training scans"));
    assert!(d.is_allow());
    // Outside the object scope, another action, another dataset, another peer: denied.
    for (peer, action, dataset, object) in [
        (LOADER, Action::Read, "imagenet", Some("val/1.jpg")),
        (LOADER, Action::Write, "imagenet", Some("train/1.jpg")),
        (LOADER, Action::Read, "other", Some("train/1.jpg")),
        (
            "spiffe://hospital.example/cpu/x",
            Action::Read,
            "imagenet",
            Some("train/1.jpg"),
        ),
        (
            "spiffe://other.example/gpu/loader-1",
            Action::Read,
            "imagenet",
            Some("train/1.jpg"),
        ),
        // An object-scoped rule never covers a request that names no object.
        (LOADER, Action::Read, "imagenet", None),
    ] {
        let d = decide(&p, peer, action, dataset, object);
        assert_eq!(
            d,
            Decision::Deny {
                rule: None,
                reason: "no rule allows it".into()
            },
            "{peer} {action} {dataset} {object:?}"
        );
    }
    // An empty policy denies everything.
    let empty = Policy::parse("").unwrap();
    assert!(!decide(&empty, LOADER, Action::List, "imagenet", None).is_allow());
}

#[test]
fn deny_rules_win_over_overlapping_allow_rules_in_any_order() {
    let p = Policy::parse(POLICY).unwrap();
    // The trainer may write checkpoints, but not the golden one.
    assert!(
        decide(
            &p,
            TRAINER,
            Action::Write,
            "checkpoints",
            Some("run-1/step-9")
        )
        .is_allow()
    );
    let d = decide(
        &p,
        TRAINER,
        Action::Write,
        "checkpoints",
        Some("golden/model.pt"),
    );
    assert_eq!(rule_of(&d), Some("nobody overwrites the golden checkpoint"));
    assert!(!d.is_allow());
    // The same with the rules in the opposite order.
    let reversed = {
        let mut chunks: Vec<&str> = POLICY.split("[[rule]]").collect();
        let head = chunks.remove(0);
        chunks.reverse();
        format!("{head}[[rule]]{}", chunks.join("[[rule]]"))
    };
    let r = Policy::parse(&reversed).unwrap();
    assert_eq!(
        r.rules().first().unwrap().name,
        "nobody overwrites the golden checkpoint"
    );
    let d = decide(
        &r,
        TRAINER,
        Action::Write,
        "checkpoints",
        Some("golden/model.pt"),
    );
    assert_eq!(rule_of(&d), Some("nobody overwrites the golden checkpoint"));
    assert!(
        decide(
            &r,
            TRAINER,
            Action::Write,
            "checkpoints",
            Some("run-1/step-9")
        )
        .is_allow()
    );
    // `golden/*` stays within one directory.
    assert!(
        decide(
            &p,
            TRAINER,
            Action::Write,
            "checkpoints",
            Some("golden/old/model.pt")
        )
        .is_allow()
    );
}

#[test]
fn data_class_rules_keep_phi_with_its_path() {
    let p = Policy::parse(POLICY).unwrap();
    assert_eq!(p.class_of("ct-head"), Some(DataClass::Phi));
    // First declaration wins: ct-deid matches "ct-*" before its own line.
    assert_eq!(p.class_of("ct-deid"), Some(DataClass::Phi));
    assert_eq!(p.class_of("imagenet"), Some(DataClass::Public));
    assert_eq!(p.class_of("checkpoints"), None);
    // A GPU loader outside the PHI path is allowed by a broad rule and denied by the class.
    let d = decide(&p, LOADER, Action::Read, "ct-head", Some("train/1.dcm"));
    assert_eq!(rule_of(&d), Some("PHI stays with the PHI trainers"));
    let d = decide(&p, LOADER, Action::List, "ct-head", None);
    assert_eq!(rule_of(&d), Some("PHI stays with the PHI trainers"));
    // One under the PHI path is allowed.
    let d = decide(&p, PHI_LOADER, Action::Read, "ct-head", Some("train/1.dcm"));
    assert_eq!(rule_of(&d), Some("loaders read training scans"));
    // The class rule does not touch public data.
    assert!(decide(&p, LOADER, Action::Read, "imagenet", Some("train/1.jpg")).is_allow());
}

#[test]
fn subjects_match_whole_path_segments() {
    let under = Subject::parse("spiffe://td/gpu/*").unwrap();
    assert!(under.matches(&id("spiffe://td/gpu/a")));
    assert!(under.matches(&id("spiffe://td/gpu/a/b")));
    assert!(!under.matches(&id("spiffe://td/gpu")));
    assert!(!under.matches(&id("spiffe://td/gpu2/a")));
    assert!(!under.matches(&id("spiffe://other/gpu/a")));
    let td = Subject::parse("spiffe://td/*").unwrap();
    assert!(td.matches(&id("spiffe://td/x")));
    assert!(!td.matches(&id("spiffe://td2/x")));
    assert!(Subject::parse("*").unwrap().matches(&id("spiffe://x/y")));
    let exact = Subject::parse("spiffe://td/gpu/a").unwrap();
    assert!(exact.matches(&id("spiffe://td/gpu/a")));
    assert!(!exact.matches(&id("spiffe://td/gpu/a/b")));
    for bad in [
        "spiffe://td/gp*",
        "spiffe://td/*/x",
        "gpu/*",
        "spiffe://TD/x",
        "",
    ] {
        assert!(Subject::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn explanations_list_every_matching_rule_and_the_one_that_decided() {
    let p = Policy::parse(POLICY).unwrap();
    let peer = id(LOADER);
    let dataset = ds("ct-head");
    let object = ObjectPath::new("train/1.dcm").unwrap();
    let e = p.explain(&Access {
        peer: &peer,
        action: Action::Read,
        dataset: &dataset,
        object: Some(&object),
    });
    assert_eq!(e.class, Some(DataClass::Phi));
    let names: Vec<(&str, Effect, Option<usize>)> = e
        .matched
        .iter()
        .map(|m| (m.name.as_str(), m.effect, m.line))
        .collect();
    assert_eq!(
        names,
        vec![
            ("loaders read training scans", Effect::Allow, Some(14)),
            ("PHI stays with the PHI trainers", Effect::Deny, Some(27)),
        ]
    );
    assert_eq!(
        e.deciding.as_deref(),
        Some("PHI stays with the PHI trainers")
    );
    assert!(matches!(&e.decision, Decision::Deny { reason, .. } if reason.contains("line 27")));
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["decision"]["decision"], "deny");
}

#[test]
fn bad_policies_are_refused_naming_the_line() {
    let cases = [
        (
            "[[rule]]\nname = \"a\"\nsubject = [\"*\"]\n",
            3,
            "unknown field",
        ),
        (
            "[[rule]]\nname = \"a\"\nsubjects = [\"*\"]\ndatasets = [\"d\"]\nactions = [\"delete\"]\n",
            5,
            "delete",
        ),
        (
            "[[rule]]\nname = \"a\"\nsubjects = [\"spiffe://td/a*b\"]\ndatasets = [\"d\"]\nactions = [\"read\"]\n",
            3,
            "wildcard",
        ),
        (
            "[[rule]]\nname = \"a\"\nsubjects = [\"*\"]\ndatasets = [\"[\"]\nactions = [\"read\"]\n",
            4,
            "dataset",
        ),
        (
            "\n[[rule]]\nname = \"a\"\ndatasets = [\"d\"]\nactions = [\"read\"]\n",
            2,
            "no subjects",
        ),
        (
            "[[dataset]]\nname = \"d\"\nclass = \"secret\"\n",
            3,
            "secret",
        ),
        ("[[rule]]\nname = \"a\"\neffect = \"maybe\"\n", 3, "maybe"),
        ("x = [\n", 1, ""),
    ];
    for (text, line, needle) in cases {
        let e = Policy::parse(text).unwrap_err();
        assert_eq!(e.line, Some(line), "{text:?}: {e}");
        assert!(e.to_string().starts_with(&format!("line {line}:")), "{e}");
        assert!(e.message.contains(needle), "{text:?}: {e}");
    }
    let dup =
        "[[rule]]\nname=\"a\"\nsubjects=[\"*\"]\ndatasets=[\"d\"]\nactions=[\"read\"]\n".repeat(2);
    assert!(Policy::parse(&dup).unwrap_err().message.contains("twice"));
}

#[test]
fn rule_errors_say_which_rule_is_broken() {
    assert!(matches!(
        Subject::parse("spiffe://td/a*b"),
        Err(RuleError::SubjectWildcard { subject }) if subject == "spiffe://td/a*b"
    ));
    for bad in ["spiffe://TD/x", "gpu/*", ""] {
        assert!(
            matches!(Subject::parse(bad), Err(RuleError::SubjectId { ref subject, .. }) if subject == bad),
            "{bad}"
        );
    }
    assert_eq!(Pattern::new("").unwrap_err(), RuleError::EmptyPattern);
    let e = Pattern::new("[").unwrap_err();
    assert!(
        matches!(&e, RuleError::Glob { pattern, .. } if pattern == "["),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("\"[\": "), "{e}");
    let rule = |name: &str| Rule {
        name: name.into(),
        effect: Effect::Allow,
        subjects: vec![Subject::Any],
        except: Vec::new(),
        datasets: vec![Pattern::new("d").unwrap()],
        objects: Vec::new(),
        classes: Vec::new(),
        actions: vec![Action::Read],
        line: None,
    };
    assert!(Policy::new(Vec::new(), vec![rule("a"), rule("b")]).is_ok());
    let e = Policy::new(Vec::new(), vec![rule("a"), rule("a")]).unwrap_err();
    assert_eq!(e, RuleError::DuplicateName { name: "a".into() });
    assert_eq!(e.to_string(), "rule name \"a\" is used twice");
}

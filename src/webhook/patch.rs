//! JSON Patch from the difference of two documents, insertion-aware: an array that gained
//! elements (the injected init container before the pod's own) becomes `add` operations at
//! their indices, never a rewrite of the elements that moved. That matters because the API
//! server applies the patch to the pod it has, which may carry fields this build does not
//! know: an index-by-index diff would rewrite those elements field by field and leave such
//! fields on the wrong container.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::{Map, Value};

/// The operations that turn `left` into `right`.
pub fn diff(left: &Value, right: &Value) -> Patch {
    let mut ops = Vec::new();
    let mut path = PointerBuf::new();
    walk(left, right, &mut path, &mut ops);
    Patch(ops)
}

fn walk(left: &Value, right: &Value, path: &mut PointerBuf, ops: &mut Vec<PatchOperation>) {
    match (left, right) {
        (Value::Object(l), Value::Object(r)) => objects(l, r, path, ops),
        (Value::Array(l), Value::Array(r)) => arrays(l, r, path, ops),
        _ if left == right => {}
        _ => ops.push(PatchOperation::Replace(ReplaceOperation {
            path: path.clone(),
            value: right.clone(),
        })),
    }
}

fn objects(
    l: &Map<String, Value>,
    r: &Map<String, Value>,
    path: &mut PointerBuf,
    ops: &mut Vec<PatchOperation>,
) {
    for (key, rv) in r {
        path.push_back(key);
        match l.get(key) {
            Some(lv) => walk(lv, rv, path, ops),
            None => ops.push(PatchOperation::Add(AddOperation {
                path: path.clone(),
                value: rv.clone(),
            })),
        }
        path.pop_back();
    }
    for key in l.keys().filter(|k| !r.contains_key(*k)) {
        path.push_back(key);
        ops.push(PatchOperation::Remove(RemoveOperation {
            path: path.clone(),
        }));
        path.pop_back();
    }
}

/// Indices of `r` not matched when `l` is a subsequence of `r` (greedy), or `None`.
fn insertions(l: &[Value], r: &[Value]) -> Option<Vec<usize>> {
    if r.len() < l.len() {
        return None;
    }
    let mut inserted = Vec::new();
    let mut i = 0;
    for (j, rv) in r.iter().enumerate() {
        // Keep enough of `r` to match what is left of `l`.
        if i < l.len() && &l[i] == rv {
            i += 1;
        } else {
            inserted.push(j);
        }
        if r.len() - j - 1 < l.len() - i {
            return None;
        }
    }
    (i == l.len()).then_some(inserted)
}

fn arrays(l: &[Value], r: &[Value], path: &mut PointerBuf, ops: &mut Vec<PatchOperation>) {
    if let Some(inserted) = insertions(l, r) {
        // Ascending indices: each `add` inserts at its final position.
        for j in inserted {
            path.push_back(j);
            ops.push(PatchOperation::Add(AddOperation {
                path: path.clone(),
                value: r[j].clone(),
            }));
            path.pop_back();
        }
        return;
    }
    // Anything else: element by element, then extra elements added or removed at the end.
    for (idx, (lv, rv)) in l.iter().zip(r).enumerate() {
        path.push_back(idx);
        walk(lv, rv, path, ops);
        path.pop_back();
    }
    for (idx, rv) in r.iter().enumerate().skip(l.len()) {
        path.push_back(idx);
        ops.push(PatchOperation::Add(AddOperation {
            path: path.clone(),
            value: rv.clone(),
        }));
        path.pop_back();
    }
    for idx in (r.len()..l.len()).rev() {
        path.push_back(idx);
        ops.push(PatchOperation::Remove(RemoveOperation {
            path: path.clone(),
        }));
        path.pop_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn applied(left: &Value, p: &Patch) -> Value {
        let mut doc = left.clone();
        json_patch::patch(&mut doc, p).unwrap();
        doc
    }

    #[test]
    fn prepending_is_one_add_and_keeps_unknown_fields_in_place() {
        let before = json!({"spec": {"initContainers": [{"name": "app-init", "image": "a"}]}});
        let after = json!({"spec": {"initContainers": [
            {"name": "schemagate-migrate", "image": "s"},
            {"name": "app-init", "image": "a"}
        ]}});
        let p = diff(&before, &after);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!([{"op": "add", "path": "/spec/initContainers/0",
                    "value": {"name": "schemagate-migrate", "image": "s"}}])
        );
        // The server's copy has a field this build does not know: it stays on app-init.
        let server = json!({"spec": {"initContainers": [
            {"name": "app-init", "image": "a", "futureField": true}
        ]}});
        let out = applied(&server, &p);
        assert_eq!(out["spec"]["initContainers"][1]["futureField"], json!(true));
        assert!(
            out["spec"]["initContainers"][0]
                .get("futureField")
                .is_none()
        );
    }

    #[test]
    fn new_keys_removed_keys_and_replacements() {
        let before = json!({"a": 1, "b": [1, 2, 3], "c": {"d": "x"}});
        let after = json!({"a": 2, "b": [1, 3], "c": {"e": "y"}, "f": null});
        assert_eq!(applied(&before, &diff(&before, &after)), after);
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (0i64..5).prop_map(|n| json!(n)),
            "[a-c]{0,2}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-c]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn the_patch_turns_left_into_right(left in value(), right in value()) {
            prop_assert_eq!(applied(&left, &diff(&left, &right)), right);
        }

        #[test]
        fn insertions_anywhere_are_adds(
            base in prop::collection::vec(value(), 0..4),
            extra in prop::collection::vec((0usize..5, value()), 1..3),
        ) {
            let mut grown = base.clone();
            for (at, v) in extra {
                let at = at.min(grown.len());
                grown.insert(at, v);
            }
            let (l, r) = (Value::Array(base), Value::Array(grown));
            let p = diff(&l, &r);
            prop_assert!(p.0.iter().all(|op| matches!(op, PatchOperation::Add(_))));
            prop_assert_eq!(applied(&l, &p), r);
        }
    }
}

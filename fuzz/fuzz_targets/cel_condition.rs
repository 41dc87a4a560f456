//! CEL source → `Condition::compile` → `evaluate` on fixed attributes: must
//! never panic (nor hang: libFuzzer's timeout catches that).
#![no_main]

use federation::policy::{AttrValue, Attributes, Condition};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    if source.len() > 4096 {
        return;
    }
    if let Ok(condition) = Condition::compile(source) {
        let mut attrs = Attributes::new();
        attrs.insert("customer_region".into(), AttrValue::Str("DE".into()));
        attrs.insert("data_class".into(), AttrValue::Str("pii".into()));
        attrs.insert("size".into(), AttrValue::Int(42));
        attrs.insert("ratio".into(), AttrValue::Double(0.5));
        attrs.insert("urgent".into(), AttrValue::Bool(true));
        attrs.insert(
            "tags".into(),
            AttrValue::List(vec![AttrValue::Str("a".into()), AttrValue::Int(1)]),
        );
        let _ = condition.evaluate(&attrs);
        let _ = condition.evaluate(&Attributes::new());
    }
});

//! CEL conditions: parsed with the `cel` crate and evaluated against a task's
//! attributes.
//!
//! (Baseline: evaluates with the `cel` interpreter. The compiled evaluator
//! replaces this; the interpreter stays as the reference it is tested against.)

use std::sync::Arc;

use super::{AttrValue, Attributes};

/// A compile error at a character offset inside the condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    /// 0-based character offset in the condition source.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

/// A compiled condition.
#[derive(Debug, Clone)]
pub struct Condition {
    source: String,
    program: Arc<cel::Program>,
}

impl Condition {
    /// Parses and compiles a CEL condition.
    pub fn compile(source: &str) -> Result<Self, CompileError> {
        let program = cel::Program::compile(source).map_err(|e| {
            let first = e.errors.first();
            CompileError {
                offset: first.map(|p| p.pos.1.max(0) as usize).unwrap_or(0),
                message: first
                    .map(|p| p.msg.clone())
                    .unwrap_or_else(|| e.to_string()),
            }
        })?;
        Ok(Self {
            source: source.to_string(),
            program: Arc::new(program),
        })
    }

    /// The CEL source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a boolean; a non-boolean result or a runtime error is an error.
    pub fn evaluate(&self, attrs: &Attributes) -> Result<bool, String> {
        interpret(&self.program, attrs)
    }
}

/// Evaluates `program` with the `cel` interpreter.
pub fn interpret(program: &cel::Program, attrs: &Attributes) -> Result<bool, String> {
    let mut ctx = cel::Context::default();
    for (k, v) in attrs {
        ctx.add_variable_from_value(k.as_str(), to_cel(v));
    }
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(format!("condition returned {other:?}, not a boolean")),
        Err(e) => Err(e.to_string()),
    }
}

/// Converts an attribute to a CEL value.
pub fn to_cel(v: &AttrValue) -> cel::Value {
    match v {
        AttrValue::Str(s) => cel::Value::String(Arc::new(s.clone())),
        AttrValue::Int(i) => cel::Value::Int(*i),
        AttrValue::Double(d) => cel::Value::Float(*d),
        AttrValue::Bool(b) => cel::Value::Bool(*b),
        AttrValue::List(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
    }
}

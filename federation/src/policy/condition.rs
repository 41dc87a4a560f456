//! CEL conditions: parsed once with the `cel` crate, statically checked, and
//! compiled into a small IR ([`CondExpr`]) that is evaluated directly against a
//! task's [`Attributes`] without building a `cel::Context` per decision.
//!
//! The IR covers identifiers, string/int/double/bool/null and list literals,
//! `==`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `&&`, `||`, `!`, `?:`, `size()`,
//! `startsWith`, `endsWith` and `contains`. Any other construct keeps the
//! rule on its `cel::Program` (compiled once), so every valid CEL condition
//! works. The IR mirrors the interpreter's semantics, errors included
//! (`error || true` is `true`, `1 == 1.0` is `true`, `'a' == 1` is `false`,
//! `'a' < 1` is an error); the property tests hold it to that.

use std::cmp::Ordering;
use std::sync::Arc;

use cel::common::ast::{Expr, LiteralValue};
use cel::parser::Expression;

use super::{AttrValue, Attributes};

/// A compile error at a character offset inside the condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    /// 0-based character offset in the condition source.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

/// A constant of the IR.
#[derive(Debug, Clone, PartialEq)]
pub enum Const {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// A double.
    Double(f64),
    /// A string.
    Str(String),
    /// A list of constants.
    List(Vec<Const>),
}

/// Ordering operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// String member functions of the IR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrFn {
    /// `s.startsWith(p)`
    StartsWith,
    /// `s.endsWith(p)`
    EndsWith,
    /// `s.contains(p)`
    Contains,
}

/// The compiled form of a condition (a tree, mirroring the CEL AST).
#[derive(Debug, Clone, PartialEq)]
pub enum CondExpr {
    /// A literal.
    Const(Const),
    /// An attribute (a CEL identifier).
    Attr(String),
    /// A list literal with non-constant elements.
    List(Vec<CondExpr>),
    /// `a && b`.
    And(Box<CondExpr>, Box<CondExpr>),
    /// `a || b`.
    Or(Box<CondExpr>, Box<CondExpr>),
    /// `!a`.
    Not(Box<CondExpr>),
    /// `c ? a : b`.
    Cond(Box<CondExpr>, Box<CondExpr>, Box<CondExpr>),
    /// `a == b`.
    Eq(Box<CondExpr>, Box<CondExpr>),
    /// `a != b`.
    Ne(Box<CondExpr>, Box<CondExpr>),
    /// `a < b` and friends.
    Cmp(CmpOp, Box<CondExpr>, Box<CondExpr>),
    /// `a in b`.
    In(Box<CondExpr>, Box<CondExpr>),
    /// `size(a)` or `a.size()`.
    Size(Box<CondExpr>),
    /// `a.startsWith(b)` and friends.
    Str(StrFn, Box<CondExpr>, Box<CondExpr>),
    /// `attr == 'c'` or `'c' == attr` (the fast path of the common case).
    AttrEqStr(String, String),
    /// `attr != 'c'` or `'c' != attr`.
    AttrNeStr(String, String),
    /// `attr in ['a', 'b']` with string constants only.
    AttrInStrs(String, Vec<String>),
}

/// A compiled condition.
#[derive(Debug, Clone)]
pub struct Condition {
    source: String,
    program: Arc<cel::Program>,
    compiled: Option<Arc<CondExpr>>,
}

impl Condition {
    /// Parses, checks and compiles a CEL condition.
    pub fn compile(source: &str) -> Result<Self, CompileError> {
        let program = cel::Program::compile(source).map_err(|e| {
            let first = e.errors.first();
            CompileError {
                offset: first
                    .map(|p| line_col_to_offset(source, p.pos.0, p.pos.1))
                    .unwrap_or(0),
                message: first
                    .map(|p| p.msg.clone())
                    .unwrap_or_else(|| e.to_string()),
            }
        })?;
        let offset_of = |id: u64| -> usize {
            program
                .source_info()
                .offset_for(id)
                .map(|(start, _)| byte_to_char(source, start as usize))
                .unwrap_or(0)
        };
        check_functions(program.expression(), &offset_of)?;
        let compiled = lower(program.expression()).ok();
        match &compiled {
            Some(node) => {
                let ty = type_of(node, program.expression(), &offset_of)?;
                if !matches!(ty, Ty::Bool | Ty::Dyn) {
                    return Err(CompileError {
                        offset: 0,
                        message: format!("condition is {}, not a boolean", ty.name()),
                    });
                }
            }
            None => static_root_check(program.expression())?,
        }
        Ok(Self {
            source: source.to_string(),
            program: Arc::new(program),
            compiled: compiled.map(Arc::new),
        })
    }

    /// The CEL source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The compiled IR, or `None` when the condition runs on the interpreter.
    pub fn ir(&self) -> Option<&CondExpr> {
        self.compiled.as_deref()
    }

    /// The attributes (variables) the condition reads.
    pub fn reads(&self) -> std::collections::BTreeSet<String> {
        self.program
            .references()
            .variables()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// The `cel` program (the reference semantics).
    pub fn program(&self) -> &cel::Program {
        &self.program
    }

    /// Evaluates to a boolean; a non-boolean result or a runtime error is an error.
    pub fn evaluate(&self, attrs: &Attributes) -> Result<bool, String> {
        match &self.compiled {
            Some(node) => match eval(node, attrs) {
                Ok(V::Bool(b)) => Ok(b),
                Ok(other) => Err(format!("condition returned {}, not a boolean", other.ty())),
                Err(e) => Err(e.to_string()),
            },
            None => interpret(&self.program, attrs),
        }
    }

    /// Evaluates with the `cel` interpreter, whatever the IR covers.
    pub fn interpret(&self, attrs: &Attributes) -> Result<bool, String> {
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

// ---------------------------------------------------------------------------
// Positions.

/// The parser reports 1-based (line, column); turn it into a 0-based char offset.
fn line_col_to_offset(source: &str, line: isize, column: isize) -> usize {
    let line = usize::try_from(line.max(1)).unwrap_or(1);
    let column = usize::try_from(column.max(1)).unwrap_or(1);
    let before: usize = source
        .split_inclusive('\n')
        .take(line - 1)
        .map(|l| l.chars().count())
        .sum();
    before + column - 1
}

/// AST offsets are byte offsets; errors report characters.
fn byte_to_char(source: &str, start: usize) -> usize {
    source
        .char_indices()
        .take_while(|(i, _)| *i < start)
        .count()
}

// ---------------------------------------------------------------------------
// Static checks.

/// Functions (and macros) the `cel` interpreter knows.
const KNOWN_FUNCTIONS: &[&str] = &[
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "duration",
    "timestamp",
    "type",
    "dyn",
    "max",
    "min",
    "has",
    "all",
    "exists",
    "exists_one",
    "map",
    "filter",
    "getFullYear",
    "getMonth",
    "getDayOfYear",
    "getDayOfMonth",
    "getDate",
    "getDayOfWeek",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
    "of",
    "ofNonZeroValue",
    "none",
    "value",
    "hasValue",
    "or",
    "orValue",
];

/// Identifiers that name a type when no attribute has the name: left to the interpreter.
const TYPE_NAMES: &[&str] = &[
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
    "dyn",
    "optional_type",
];

fn check_functions(
    expr: &Expression,
    offset_of: &dyn Fn(u64) -> usize,
) -> Result<(), CompileError> {
    match &expr.expr {
        Expr::Call(call) => {
            let name = call.func_name.as_str();
            let operator = name.starts_with('_') || name.starts_with('@') || name.ends_with('_');
            if !operator && !KNOWN_FUNCTIONS.contains(&name) {
                return Err(CompileError {
                    offset: offset_of(expr.id),
                    message: format!("unknown function `{name}`"),
                });
            }
            if let Some(t) = &call.target {
                check_functions(t, offset_of)?;
            }
            for a in &call.args {
                check_functions(a, offset_of)?;
            }
            Ok(())
        }
        Expr::List(l) => l
            .elements
            .iter()
            .try_for_each(|e| check_functions(e, offset_of)),
        Expr::Select(s) => check_functions(&s.operand, offset_of),
        _ => Ok(()),
    }
}

/// For conditions outside the IR: a literal root is never a boolean condition.
fn static_root_check(expr: &Expression) -> Result<(), CompileError> {
    let what = match &expr.expr {
        Expr::Literal(LiteralValue::Boolean(_)) => return Ok(()),
        Expr::Literal(_) => "a literal",
        Expr::Map(_) => "a map",
        Expr::List(_) => "a list",
        Expr::Call(c)
            if matches!(
                c.func_name.as_str(),
                "_+_"
                    | "_-_"
                    | "_*_"
                    | "_/_"
                    | "_%_"
                    | "-_"
                    | "size"
                    | "int"
                    | "uint"
                    | "double"
                    | "string"
                    | "bytes"
            ) =>
        {
            "a number or string"
        }
        _ => return Ok(()),
    };
    Err(CompileError {
        offset: 0,
        message: format!("condition is {what}, not a boolean"),
    })
}

/// Static types, as far as literals tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    Int,
    Double,
    Str,
    Null,
    List,
    Dyn,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Int => "int",
            Ty::Double => "double",
            Ty::Str => "string",
            Ty::Null => "null",
            Ty::List => "list",
            Ty::Dyn => "dyn",
        }
    }
    fn numeric(self) -> bool {
        matches!(self, Ty::Int | Ty::Double)
    }
    fn of_const(c: &Const) -> Ty {
        match c {
            Const::Null => Ty::Null,
            Const::Bool(_) => Ty::Bool,
            Const::Int(_) => Ty::Int,
            Const::Double(_) => Ty::Double,
            Const::Str(_) => Ty::Str,
            Const::List(_) => Ty::List,
        }
    }
}

/// Both known and not comparable for equality.
fn incompatible(a: Ty, b: Ty) -> bool {
    a != Ty::Dyn && b != Ty::Dyn && a != b && !(a.numeric() && b.numeric())
}

/// Type-checks the IR node `node`, lowered from `expr` (walked in step for offsets).
fn type_of(
    node: &CondExpr,
    expr: &Expression,
    offset_of: &dyn Fn(u64) -> usize,
) -> Result<Ty, CompileError> {
    let args: Vec<&Expression> = match &expr.expr {
        Expr::Call(c) => c
            .target
            .iter()
            .map(|t| t.as_ref())
            .chain(c.args.iter())
            .collect(),
        Expr::List(l) => l.elements.iter().collect(),
        _ => Vec::new(),
    };
    let arg = |i: usize| args.get(i).copied().unwrap_or(expr);
    let at = |e: &Expression, message: String| CompileError {
        offset: offset_of(e.id),
        message,
    };
    let want_bool = |t: Ty, e: &Expression, op: &str| {
        if matches!(t, Ty::Bool | Ty::Dyn) {
            Ok(())
        } else {
            Err(at(
                e,
                format!("operand of `{op}` is {}, not a boolean", t.name()),
            ))
        }
    };
    Ok(match node {
        CondExpr::Const(c) => Ty::of_const(c),
        CondExpr::Attr(_) => Ty::Dyn,
        CondExpr::AttrEqStr(..) | CondExpr::AttrNeStr(..) | CondExpr::AttrInStrs(..) => Ty::Bool,
        CondExpr::List(items) => {
            for (i, n) in items.iter().enumerate() {
                type_of(n, arg(i), offset_of)?;
            }
            Ty::List
        }
        CondExpr::And(a, b) | CondExpr::Or(a, b) => {
            let op = if matches!(node, CondExpr::And(..)) {
                "&&"
            } else {
                "||"
            };
            want_bool(type_of(a, arg(0), offset_of)?, arg(0), op)?;
            want_bool(type_of(b, arg(1), offset_of)?, arg(1), op)?;
            Ty::Bool
        }
        CondExpr::Not(a) => {
            want_bool(type_of(a, arg(0), offset_of)?, arg(0), "!")?;
            Ty::Bool
        }
        CondExpr::Cond(c, a, b) => {
            want_bool(type_of(c, arg(0), offset_of)?, arg(0), "?:")?;
            let ta = type_of(a, arg(1), offset_of)?;
            let tb = type_of(b, arg(2), offset_of)?;
            if ta == tb { ta } else { Ty::Dyn }
        }
        CondExpr::Eq(a, b) | CondExpr::Ne(a, b) => {
            let ta = type_of(a, arg(0), offset_of)?;
            let tb = type_of(b, arg(1), offset_of)?;
            if incompatible(ta, tb) {
                return Err(at(
                    expr,
                    format!(
                        "comparison of {} with {} is always false",
                        ta.name(),
                        tb.name()
                    ),
                ));
            }
            Ty::Bool
        }
        CondExpr::Cmp(_, a, b) => {
            let ta = type_of(a, arg(0), offset_of)?;
            let tb = type_of(b, arg(1), offset_of)?;
            let unorderable = |t: Ty| matches!(t, Ty::List | Ty::Null);
            if unorderable(ta) || unorderable(tb) || incompatible(ta, tb) {
                return Err(at(
                    expr,
                    format!("cannot order {} against {}", ta.name(), tb.name()),
                ));
            }
            Ty::Bool
        }
        CondExpr::In(a, b) => {
            type_of(a, arg(0), offset_of)?;
            let tb = type_of(b, arg(1), offset_of)?;
            if !matches!(tb, Ty::List | Ty::Dyn) {
                return Err(at(
                    arg(1),
                    format!("right side of `in` is {}, not a list", tb.name()),
                ));
            }
            Ty::Bool
        }
        CondExpr::Size(a) => {
            let ta = type_of(a, arg(0), offset_of)?;
            if !matches!(ta, Ty::Str | Ty::List | Ty::Dyn) {
                return Err(at(arg(0), format!("size() of {}", ta.name())));
            }
            Ty::Int
        }
        CondExpr::Str(f, a, b) => {
            for (i, n) in [a, b].into_iter().enumerate() {
                let t = type_of(n, arg(i), offset_of)?;
                if !matches!(t, Ty::Str | Ty::Dyn) {
                    return Err(at(arg(i), format!("{f:?} needs strings, got {}", t.name())));
                }
            }
            Ty::Bool
        }
    })
}

// ---------------------------------------------------------------------------
// Lowering the CEL AST to the IR.

/// Marks a construct the IR does not cover (the interpreter takes the rule).
struct Unsupported;

fn lower(expr: &Expression) -> Result<CondExpr, Unsupported> {
    match &expr.expr {
        Expr::Literal(lit) => Ok(CondExpr::Const(match lit {
            LiteralValue::Boolean(b) => Const::Bool(*b.inner()),
            LiteralValue::Int(i) => Const::Int(*i.inner()),
            LiteralValue::Double(d) => Const::Double(*d.inner()),
            LiteralValue::String(s) => Const::Str(s.inner().to_string()),
            LiteralValue::Null => Const::Null,
            LiteralValue::Bytes(_) | LiteralValue::UInt(_) => return Err(Unsupported),
        })),
        Expr::Ident(name) => {
            if TYPE_NAMES.contains(&name.as_str()) || name.starts_with('.') {
                Err(Unsupported)
            } else {
                Ok(CondExpr::Attr(name.clone()))
            }
        }
        Expr::List(list) => {
            if !list.optional_indices.is_empty() {
                return Err(Unsupported);
            }
            let items = list
                .elements
                .iter()
                .map(lower)
                .collect::<Result<Vec<_>, _>>()?;
            let consts: Option<Vec<Const>> = items
                .iter()
                .map(|n| match n {
                    CondExpr::Const(c) => Some(c.clone()),
                    _ => None,
                })
                .collect();
            Ok(match consts {
                Some(c) => CondExpr::Const(Const::List(c)),
                None => CondExpr::List(items),
            })
        }
        Expr::Call(call) => {
            use cel::common::ast::operators as op;
            let b = |e: &Expression| lower(e).map(Box::new);
            let name = call.func_name.as_str();
            match (&call.target, call.args.as_slice()) {
                (None, [a, x]) => {
                    let (a, x) = (b(a)?, b(x)?);
                    if let Some(fast) = specialize(name, &a, &x) {
                        return Ok(fast);
                    }
                    Ok(match name {
                        op::LOGICAL_AND => CondExpr::And(a, x),
                        op::LOGICAL_OR => CondExpr::Or(a, x),
                        op::EQUALS => CondExpr::Eq(a, x),
                        op::NOT_EQUALS => CondExpr::Ne(a, x),
                        op::LESS => CondExpr::Cmp(CmpOp::Lt, a, x),
                        op::LESS_EQUALS => CondExpr::Cmp(CmpOp::Le, a, x),
                        op::GREATER => CondExpr::Cmp(CmpOp::Gt, a, x),
                        op::GREATER_EQUALS => CondExpr::Cmp(CmpOp::Ge, a, x),
                        op::IN => CondExpr::In(a, x),
                        _ => return Err(Unsupported),
                    })
                }
                (None, [c, a, x]) if name == op::CONDITIONAL => {
                    Ok(CondExpr::Cond(b(c)?, b(a)?, b(x)?))
                }
                (None, [a]) if name == op::LOGICAL_NOT => Ok(CondExpr::Not(b(a)?)),
                (None, [a]) if name == "size" => Ok(CondExpr::Size(b(a)?)),
                (Some(t), []) if name == "size" && !is_qualified_ident(t) => {
                    Ok(CondExpr::Size(b(t)?))
                }
                (Some(t), [a]) if !is_qualified_ident(t) => {
                    let f = match name {
                        "startsWith" => StrFn::StartsWith,
                        "endsWith" => StrFn::EndsWith,
                        "contains" => StrFn::Contains,
                        _ => return Err(Unsupported),
                    };
                    Ok(CondExpr::Str(f, b(t)?, b(a)?))
                }
                _ => Err(Unsupported),
            }
        }
        _ => Err(Unsupported),
    }
}

/// The fast forms of comparisons between an attribute and string constants.
fn specialize(name: &str, a: &CondExpr, x: &CondExpr) -> Option<CondExpr> {
    use cel::common::ast::operators as op;
    let attr_str = || match (a, x) {
        (CondExpr::Attr(n), CondExpr::Const(Const::Str(c)))
        | (CondExpr::Const(Const::Str(c)), CondExpr::Attr(n)) => Some((n.clone(), c.clone())),
        _ => None,
    };
    match name {
        op::EQUALS => attr_str().map(|(n, c)| CondExpr::AttrEqStr(n, c)),
        op::NOT_EQUALS => attr_str().map(|(n, c)| CondExpr::AttrNeStr(n, c)),
        op::IN => match (a, x) {
            (CondExpr::Attr(n), CondExpr::Const(Const::List(items))) => items
                .iter()
                .map(|c| match c {
                    Const::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(|strs| CondExpr::AttrInStrs(n.clone(), strs)),
            _ => None,
        },
        _ => None,
    }
}

/// `a.b` forms (qualified names) resolve differently: left to the interpreter.
fn is_qualified_ident(e: &Expression) -> bool {
    matches!(e.expr, Expr::Select(_))
}

// ---------------------------------------------------------------------------
// Evaluation.

/// A value during evaluation, borrowing the attributes and the IR.
#[derive(Debug, Clone)]
enum V<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(&'a str),
    /// A list attribute.
    AList(&'a [AttrValue]),
    /// A constant list.
    CList(&'a [Const]),
    /// A list literal built at run time.
    DList(Vec<V<'a>>),
}

impl<'a> V<'a> {
    fn of_attr(a: &'a AttrValue) -> Self {
        match a {
            AttrValue::Str(s) => V::Str(s),
            AttrValue::Int(i) => V::Int(*i),
            AttrValue::Double(d) => V::Double(*d),
            AttrValue::Bool(b) => V::Bool(*b),
            AttrValue::List(l) => V::AList(l),
        }
    }
    fn of_const(c: &'a Const) -> Self {
        match c {
            Const::Null => V::Null,
            Const::Bool(b) => V::Bool(*b),
            Const::Int(i) => V::Int(*i),
            Const::Double(d) => V::Double(*d),
            Const::Str(s) => V::Str(s),
            Const::List(l) => V::CList(l),
        }
    }
    fn ty(&self) -> &'static str {
        match self {
            V::Null => "null",
            V::Bool(_) => "bool",
            V::Int(_) => "int",
            V::Double(_) => "double",
            V::Str(_) => "string",
            V::AList(_) | V::CList(_) | V::DList(_) => "list",
        }
    }
    fn list_len(&self) -> Option<usize> {
        match self {
            V::AList(l) => Some(l.len()),
            V::CList(l) => Some(l.len()),
            V::DList(l) => Some(l.len()),
            _ => None,
        }
    }
    fn list_get(&self, i: usize) -> Option<V<'_>> {
        match self {
            V::AList(l) => l.get(i).map(V::of_attr),
            V::CList(l) => l.get(i).map(V::of_const),
            V::DList(l) => l.get(i).cloned(),
            _ => None,
        }
    }
}

/// Numeric comparison as the interpreter does it (`None`: not comparable).
fn num_cmp(a: &V<'_>, b: &V<'_>) -> Option<Option<Ordering>> {
    match (a, b) {
        (V::Int(x), V::Int(y)) => Some(Some(x.cmp(y))),
        (V::Int(x), V::Double(y)) => Some((*x as f64).partial_cmp(y)),
        (V::Double(x), V::Int(y)) => Some(x.partial_cmp(&(*y as f64))),
        (V::Double(x), V::Double(y)) => Some(x.partial_cmp(y)),
        _ => None,
    }
}

/// CEL equality of the `cel` crate: numbers across int/double, lists
/// element-wise, otherwise same type and value.
fn equals(a: &V<'_>, b: &V<'_>) -> bool {
    if let Some(o) = num_cmp(a, b) {
        return o == Some(Ordering::Equal);
    }
    match (a, b) {
        (V::Null, V::Null) => true,
        (V::Bool(x), V::Bool(y)) => x == y,
        (V::Str(x), V::Str(y)) => x == y,
        _ => match (a.list_len(), b.list_len()) {
            (Some(n), Some(m)) if n == m => (0..n).all(|i| match (a.list_get(i), b.list_get(i)) {
                (Some(x), Some(y)) => equals(&x, &y),
                _ => false,
            }),
            _ => false,
        },
    }
}

/// An evaluation error (formatted only when reported).
#[derive(Debug)]
enum Fault<'a> {
    /// A missing attribute.
    Undeclared(&'a str),
    /// A function or operator applied to the wrong types.
    NoOverload(&'static str, &'static str, &'static str),
    /// A non-boolean where a boolean was needed.
    NotBool(&'static str),
}

impl std::fmt::Display for Fault<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Undeclared(name) => write!(f, "Undeclared reference to '{name}'"),
            Fault::NoOverload(op, a, b) => {
                write!(
                    f,
                    "No such overload for {op} with argument types ({a}, {b})"
                )
            }
            Fault::NotBool(got) => write!(f, "Unexpected type: got '{got}', want 'bool'"),
        }
    }
}

fn as_bool<'a>(r: Result<V<'a>, Fault<'a>>) -> Result<bool, Fault<'a>> {
    match r? {
        V::Bool(b) => Ok(b),
        other => Err(Fault::NotBool(other.ty())),
    }
}

fn eval<'a>(node: &'a CondExpr, attrs: &'a Attributes) -> Result<V<'a>, Fault<'a>> {
    Ok(match node {
        CondExpr::Const(c) => V::of_const(c),
        CondExpr::Attr(name) => match attrs.get(name.as_str()) {
            Some(v) => V::of_attr(v),
            None => return Err(Fault::Undeclared(name)),
        },
        CondExpr::AttrEqStr(name, c) | CondExpr::AttrNeStr(name, c) => {
            let eq = match attrs.get(name.as_str()) {
                Some(AttrValue::Str(s)) => s == c,
                Some(_) => false,
                None => return Err(Fault::Undeclared(name)),
            };
            V::Bool(eq == matches!(node, CondExpr::AttrEqStr(..)))
        }
        CondExpr::AttrInStrs(name, list) => match attrs.get(name.as_str()) {
            Some(AttrValue::Str(s)) => V::Bool(list.iter().any(|c| c == s)),
            Some(_) => V::Bool(false),
            None => return Err(Fault::Undeclared(name)),
        },
        CondExpr::List(items) => V::DList(
            items
                .iter()
                .map(|n| eval(n, attrs))
                .collect::<Result<_, _>>()?,
        ),
        CondExpr::Or(a, b) => {
            let left = as_bool(eval(a, attrs));
            if let Ok(true) = left {
                return Ok(V::Bool(true));
            }
            let right = eval(b, attrs)?;
            match (left, right) {
                (Ok(false), V::Bool(r)) => V::Bool(r),
                (Err(_), V::Bool(true)) => V::Bool(true),
                (Err(e), _) => return Err(e),
                (Ok(_), r) => return Err(Fault::NoOverload("_||_", "bool", r.ty())),
            }
        }
        CondExpr::And(a, b) => {
            let left = as_bool(eval(a, attrs));
            if let Ok(false) = left {
                return Ok(V::Bool(false));
            }
            let right = eval(b, attrs)?;
            match (left, right) {
                (Ok(true), V::Bool(r)) => V::Bool(r),
                (Err(_), V::Bool(false)) => V::Bool(false),
                (Err(e), _) => return Err(e),
                (Ok(_), r) => return Err(Fault::NoOverload("_&&_", "bool", r.ty())),
            }
        }
        CondExpr::Not(a) => match eval(a, attrs)? {
            V::Bool(b) => V::Bool(!b),
            other => return Err(Fault::NoOverload("!_", other.ty(), "")),
        },
        CondExpr::Cond(c, a, b) => {
            if as_bool(eval(c, attrs))? {
                eval(a, attrs)?
            } else {
                eval(b, attrs)?
            }
        }
        CondExpr::Eq(a, b) => {
            let x = eval(a, attrs)?;
            let y = eval(b, attrs)?;
            V::Bool(equals(&x, &y))
        }
        CondExpr::Ne(a, b) => {
            let x = eval(a, attrs)?;
            let y = eval(b, attrs)?;
            V::Bool(!equals(&x, &y))
        }
        CondExpr::Cmp(op, a, b) => {
            let x = eval(a, attrs)?;
            let y = eval(b, attrs)?;
            let ord = match num_cmp(&x, &y) {
                Some(Some(o)) => Some(o),
                Some(None) => None,
                None => match (&x, &y) {
                    (V::Str(p), V::Str(q)) => Some(p.cmp(q)),
                    (V::Bool(p), V::Bool(q)) => Some(p.cmp(q)),
                    _ => None,
                },
            };
            let Some(ord) = ord else {
                let name = match op {
                    CmpOp::Lt => "_<_",
                    CmpOp::Le => "_<=_",
                    CmpOp::Gt => "_>_",
                    CmpOp::Ge => "_>=_",
                };
                return Err(Fault::NoOverload(name, x.ty(), y.ty()));
            };
            V::Bool(match op {
                CmpOp::Lt => ord == Ordering::Less,
                CmpOp::Le => ord != Ordering::Greater,
                CmpOp::Gt => ord == Ordering::Greater,
                CmpOp::Ge => ord != Ordering::Less,
            })
        }
        CondExpr::In(a, b) => {
            let x = eval(a, attrs)?;
            let list = eval(b, attrs)?;
            let Some(n) = list.list_len() else {
                return Err(Fault::NoOverload("@in", x.ty(), list.ty()));
            };
            V::Bool((0..n).any(|i| list.list_get(i).is_some_and(|item| equals(&x, &item))))
        }
        CondExpr::Size(a) => {
            let x = eval(a, attrs)?;
            match &x {
                V::Str(s) => V::Int(s.chars().count() as i64),
                _ => match x.list_len() {
                    Some(n) => V::Int(n as i64),
                    None => return Err(Fault::NoOverload("size", x.ty(), "")),
                },
            }
        }
        CondExpr::Str(f, t, a) => {
            // The interpreter evaluates the argument before the target.
            let arg = eval(a, attrs)?;
            let target = eval(t, attrs)?;
            match (target, arg) {
                (V::Str(s), V::Str(p)) => V::Bool(match f {
                    StrFn::StartsWith => s.starts_with(p),
                    StrFn::EndsWith => s.ends_with(p),
                    StrFn::Contains => s.contains(p),
                }),
                (s, p) => {
                    let name = match f {
                        StrFn::StartsWith => "startsWith",
                        StrFn::EndsWith => "endsWith",
                        StrFn::Contains => "contains",
                    };
                    return Err(Fault::NoOverload(name, s.ty(), p.ty()));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests;

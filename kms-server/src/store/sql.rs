//! What the queries need of a backend: run one statement in the current transaction, with
//! parameters, and read its rows. `Tx`'s queries are written once, against this, in SQL both
//! SQLite and PostgreSQL take: `?N` placeholders (a backend that numbers them otherwise rewrites
//! them), integers as 64-bit, `COALESCE`, `CASE`, `RETURNING`, `ON CONFLICT ... DO NOTHING`.

use super::StoreError;

/// A parameter bound to a statement.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl From<i64> for Param<'_> {
    fn from(n: i64) -> Self {
        Param::Int(n)
    }
}

impl From<u32> for Param<'_> {
    fn from(n: u32) -> Self {
        Param::Int(i64::from(n))
    }
}

impl From<bool> for Param<'_> {
    fn from(b: bool) -> Self {
        Param::Int(i64::from(b))
    }
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(s: &'a str) -> Self {
        Param::Text(s)
    }
}

impl<'a> From<&'a String> for Param<'a> {
    fn from(s: &'a String) -> Self {
        Param::Text(s)
    }
}

impl<'a> From<&'a [u8]> for Param<'a> {
    fn from(b: &'a [u8]) -> Self {
        Param::Blob(b)
    }
}

impl<'a> From<&'a Vec<u8>> for Param<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        Param::Blob(b)
    }
}

impl<'a, T: Into<Param<'a>>> From<Option<T>> for Param<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Param::Null, Into::into)
    }
}

/// A value read from a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// One row of a result, its columns in the order the statement named them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Value>);

/// A column of a row could not be read as asked (a bug, or a database written by something else).
fn wrong(i: usize, want: &str, got: &Value) -> StoreError {
    StoreError::Corrupt { table: "row", detail: format!("column {i} is {got:?}, not {want}") }
}

impl Row {
    fn at(&self, i: usize) -> Result<&Value, StoreError> {
        self.0.get(i).ok_or_else(|| StoreError::Corrupt { table: "row", detail: format!("no column {i}") })
    }

    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.at(i)? {
            Value::Int(n) => Ok(*n),
            other => Err(wrong(i, "an integer", other)),
        }
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        match self.at(i)? {
            Value::Text(s) => Ok(s.clone()),
            other => Err(wrong(i, "text", other)),
        }
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    pub fn blob(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        match self.at(i)? {
            Value::Blob(b) => Ok(b.clone()),
            other => Err(wrong(i, "bytes", other)),
        }
    }

    pub fn flag(&self, i: usize) -> Result<bool, StoreError> {
        self.int(i).map(|n| n != 0)
    }
}

/// One transaction of a backend.
pub trait Sql {
    /// Runs a statement; returns how many rows it changed.
    fn execute(&self, sql: &'static str, params: &[Param<'_>]) -> Result<u64, StoreError>;

    /// Runs a statement and reads every row it returns.
    fn query(&self, sql: &'static str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError>;

    /// Runs a statement built at run time (its column list from a constant, say).
    fn execute_dynamic(&self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError>;

    /// Runs a query built at run time (a copy of a whole table).
    fn query_dynamic(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError>;

    /// Inserts rows of `width` values each (`params`, row after row) with `insert`, a statement
    /// up to its `VALUES`; nobody reads the answer. PostgreSQL sends one statement for them all
    /// ([`multi_row`]) with the transaction's next statement or with its commit, in one round
    /// trip (its failure then fails that one); SQLite, in-process, runs one cached one-row
    /// statement per row (no statement to parse for each number of rows).
    fn insert_rows(&self, insert: &str, width: usize, params: &[Param<'_>]) -> Result<(), StoreError>;

    /// After rows were copied in with their own ids: lets the next generated id follow them.
    fn after_copy(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Makes this transaction the only one appending to the audit chain until it ends (a backend
    /// whose write transactions run one at a time has nothing to do).
    fn lock_audit_head(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// `insert` (a statement up to its `VALUES`) for `values` values in rows of `width` (at least
/// 1): `… VALUES (?1, ?2), (?3, ?4)`.
pub fn multi_row(insert: &str, width: usize, values: usize) -> String {
    let mut sql = String::with_capacity(insert.len() + values * 6);
    sql.push_str(insert);
    for n in 1..=values {
        sql.push_str(if n == 1 {
            "(?"
        } else if (n - 1) % width == 0 {
            "), (?"
        } else {
            ", ?"
        });
        sql.push_str(&n.to_string());
    }
    if values > 0 {
        sql.push(')');
    }
    sql
}

/// The first row of a query, if any.
pub fn first(rows: Vec<Row>) -> Option<Row> {
    rows.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_their_types_or_say_what_is_wrong() {
        let row = Row(vec![Value::Int(3), Value::Null, Value::Text("x".into()), Value::Blob(vec![1])]);
        assert_eq!(row.int(0).unwrap(), 3);
        assert_eq!(row.opt_int(1).unwrap(), None);
        assert_eq!(row.text(2).unwrap(), "x");
        assert_eq!(row.blob(3).unwrap(), vec![1]);
        assert!(row.flag(0).unwrap());
        assert!(row.text(0).is_err() && row.int(9).is_err());
    }

    #[test]
    fn a_multi_row_insert_numbers_its_values_row_after_row() {
        assert_eq!(multi_row("INSERT INTO t (a, b) VALUES ", 2, 4), "INSERT INTO t (a, b) VALUES (?1, ?2), (?3, ?4)");
        assert_eq!(multi_row("V ", 1, 2), "V (?1), (?2)");
        assert_eq!(multi_row("V ", 3, 3), "V (?1, ?2, ?3)");
    }
}

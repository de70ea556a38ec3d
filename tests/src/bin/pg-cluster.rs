//! Starts or stops the PostgreSQL cluster a test run shares (`tests/src/pg.rs`):
//!
//! * `pg-cluster start FILE`: starts one and writes what the tests need to reach it to FILE,
//!   which `KMS_TEST_PG` then names (`cargo xtask test` does both);
//! * `pg-cluster stop FILE`: stops it and removes its directory and FILE.

use anyhow::{Context, Result, bail};
use kms_tests::pg::Postgres;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, action, file] = args.as_slice() else {
        bail!("usage: pg-cluster start|stop FILE");
    };
    match action.as_str() {
        "start" => {
            let pg = Postgres::start()?;
            std::fs::write(file, pg.describe()).with_context(|| file.clone())?;
            println!("PostgreSQL on 127.0.0.1:{} ({})", pg.port, pg.dir.display());
            pg.detach();
        }
        "stop" => {
            let text = std::fs::read_to_string(file).with_context(|| file.clone())?;
            let pg = Postgres::attach(&text)?;
            pg.stop()?;
            std::fs::remove_dir_all(&pg.dir)?;
            std::fs::remove_file(file)?;
        }
        other => bail!("unknown action {other}: start or stop"),
    }
    Ok(())
}

//! Remote functions on an embedded cluster: tasks returning at once, object
//! references passed as arguments, and a big value in shared memory.
//!
//! Run: `cargo run --release --example hello_tasks`

#[braid::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[braid::remote]
fn square(x: i64) -> i64 {
    println!("squaring {x}");
    x * x
}

#[braid::remote]
fn total(values: Vec<f32>) -> f64 {
    values.iter().map(|v| f64::from(*v)).sum()
}

/// Remote functions on an embedded cluster: tasks, object references passed
/// as arguments, and a big value in shared memory. Takes no arguments.
#[derive(clap::Parser)]
#[command(name = "hello_tasks")]
struct Args {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {} = clap::Parser::parse();
    let rt = braid::init().await?;
    let x = add::remote(&rt, 1, 2)?;
    let y = add::remote(&rt, &x, 10)?;
    println!("1 + 2 + 10 = {}", rt.get(&y).await?);

    let squares: Vec<_> = (0..10)
        .map(|i| square::remote(&rt, i))
        .collect::<Result<_, _>>()?;
    let values = rt.get_all(&squares).await?;
    println!("squares: {values:?}");

    let big = rt.put(&vec![0.5f32; 1 << 20])?;
    let sum = total::remote(&rt, &big)?;
    println!(
        "sum of a 4 MiB vector passed by reference: {}",
        rt.get(&sum).await?
    );
    rt.shutdown().await;
    Ok(())
}

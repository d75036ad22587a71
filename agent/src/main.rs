use clap::Parser;
fn main() -> std::process::ExitCode {
    #[derive(Parser)]
    struct A { paths: Vec<std::path::PathBuf> }
    let a = A::parse();
    match plantmesh::config::load(&a.paths) {
        Ok(p) => { println!("ok {} products {} tags", p.products.len(), p.tags.len()); 0.into() }
        Err(d) => { eprintln!("{d}"); 1.into() }
    }
}

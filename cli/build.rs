include!("../build/commit.rs");

fn main() {
    set_commit_env();
}

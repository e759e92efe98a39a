//! Prints documents generated from the control schema: `markdown` (the README's command
//! table), `python` (scripts/lib/control_api.py) or `json` (every schema).

use std::process::ExitCode;

fn main() -> ExitCode {
    let what = std::env::args().nth(1).unwrap_or_default();
    match what.as_str() {
        "markdown" => print!("{}", control_api::catalog::markdown_commands()),
        "python" => print!("{}", control_api::catalog::python_module()),
        "json" => {
            let (commands, events) = control_api::catalog();
            let doc = serde_json::json!({
                "commands": commands.iter().map(|c| serde_json::json!({
                    "name": c.name, "doc": c.doc, "arguments": c.args, "returns": c.reply,
                })).collect::<Vec<_>>(),
                "events": events.iter().map(|e| serde_json::json!({
                    "name": e.name, "doc": e.doc, "data": e.data,
                })).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&doc).expect("schemas serialise"));
        }
        _ => {
            eprintln!("usage: control-schema markdown|python|json");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

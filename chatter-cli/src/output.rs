//! Printing: tables and pretty JSON for a person, one JSON value per line for a program.

use std::io::Write;

use serde_json::Value;

/// Prints `value`: pretty on a terminal, on one line when `json`.
pub(crate) fn value(value: &Value, json: bool) {
    let text = if json {
        value.to_string()
    } else {
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    };
    line(&text);
}

/// Prints one line to stdout (a closed pipe ends the program quietly, like other tools).
pub(crate) fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").is_err() {
        std::process::exit(0);
    }
}

/// Prints rows as a table with a header, columns padded to the widest cell (the last
/// column is not padded).
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let render = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            text.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text
    };
    line(&render(header.to_vec()));
    for row in rows {
        line(&render(row.iter().map(String::as_str).collect()));
    }
}

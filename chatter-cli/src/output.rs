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

/// Prints rows as a table with a header (see [`table_text`]).
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
    line(table_text(header, rows).trim_end_matches('\n'));
}

/// Rows as a table with a header, columns padded to the widest cell plus two spaces (the
/// last column is not padded), one line each.
pub(crate) fn table_text(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for cells in std::iter::once(&header).chain(rows) {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            text.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::table_text;

    #[test]
    fn tables_pad_every_column_but_the_last() {
        let rows = vec![
            vec![
                "calc".to_owned(),
                "Calculator".to_owned(),
                "add, div".to_owned(),
            ],
            vec![
                "chatter.introspect".to_owned(),
                "-".to_owned(),
                String::new(),
            ],
        ];
        assert_eq!(
            table_text(&["OBJECT", "INTERFACE", "METHODS"], &rows),
            "OBJECT              INTERFACE   METHODS\n\
             calc                Calculator  add, div\n\
             chatter.introspect  -           \n"
        );
    }
}

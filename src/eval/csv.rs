//! A small RFC 4180 CSV reader (enough for the PMC-VQA files; no dependency).
//!
//! Fields are separated by `,`; records by `\n` or `\r\n`; a field in double quotes may contain
//! commas, newlines and doubled quotes (`""` = `"`). A UTF-8 byte-order mark is dropped. Quotes
//! inside an unquoted field are kept literally (as Python's csv module does).

use anyhow::{bail, Result};

/// One parsed row and the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub line: usize,
    pub fields: Vec<String>,
}

/// Parse a whole CSV text into rows (blank lines are skipped).
pub fn parse(text: &str) -> Result<Vec<Row>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut rows = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut quoted_field = false;
    let mut line = 1usize;
    let mut row_line = 1usize;
    let mut chars = text.chars().peekable();
    let mut row_has_content = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !quoted_field => {
                in_quotes = true;
                quoted_field = true;
                row_has_content = true;
            }
            ',' => {
                fields.push(std::mem::take(&mut field));
                quoted_field = false;
                row_has_content = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if row_has_content || !field.is_empty() {
                    fields.push(std::mem::take(&mut field));
                    rows.push(Row {
                        line: row_line,
                        fields: std::mem::take(&mut fields),
                    });
                }
                quoted_field = false;
                row_has_content = false;
                line += 1;
                row_line = line;
            }
            _ => {
                field.push(c);
                row_has_content = true;
            }
        }
    }
    if in_quotes {
        bail!("line {row_line}: unterminated quoted field");
    }
    if row_has_content || !field.is_empty() {
        fields.push(field);
        rows.push(Row {
            line: row_line,
            fields,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_commas_newlines() {
        let t = "\u{feff}a,b,c\r\n1,\"x, y\",\"he said \"\"hi\"\"\"\n\n2,\"multi\nline\",\n";
        let rows = parse(t).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].fields, vec!["a", "b", "c"]);
        assert_eq!(rows[1].fields, vec!["1", "x, y", "he said \"hi\""]);
        assert_eq!(rows[2].line, 4);
        assert_eq!(rows[2].fields, vec!["2", "multi\nline", ""]);
        assert!(parse("a,\"b\n").is_err());
        assert_eq!(parse("x").unwrap()[0].fields, vec!["x"]);
    }
}

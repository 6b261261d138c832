//! Plain-text tables and key/value blocks: pure formatting, no I/O.

/// Renders a table with a header row and columns padded to their widest
/// cell. Cells are measured in characters, so non-ASCII stays aligned.
/// The last column is not padded (no trailing blanks).
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for r in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, w) in widths.iter().enumerate() {
            let cell = r.get(i).map(String::as_str).unwrap_or("");
            if i + 1 == cols {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Renders `key: value` lines with the values aligned.
pub fn render_kv(pairs: &[(&str, String)]) -> String {
    let w = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k}:{} {v}\n", " ".repeat(w - k.chars().count())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let t = render(
            &["ID", "SIZE", "NOTE"],
            &[
                vec!["vol-a".into(), "1GiB".into(), "x".into()],
                vec!["v".into(), "64GiB".into(), String::new()],
            ],
        );
        assert_eq!(t, "ID     SIZE   NOTE\nvol-a  1GiB   x\nv      64GiB\n");
    }

    #[test]
    fn empty_table_has_header() {
        assert_eq!(render(&["A", "B"], &[]), "A  B\n");
    }

    #[test]
    fn short_rows_are_padded() {
        let t = render(&["A", "B"], &[vec!["long-cell".into()]]);
        assert_eq!(t, "A          B\nlong-cell\n");
    }

    #[test]
    fn key_values_align() {
        let t = render_kv(&[("pool", "/p".into()), ("daemon pid", "42".into())]);
        assert_eq!(t, "pool:       /p\ndaemon pid: 42\n");
    }
}

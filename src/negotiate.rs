//! Content negotiation: the weighted lists of `Accept` and `Accept-Encoding` (RFC 9110 §12.4.2), read once here
//! for every route that chooses a representation. No crate in our tree parses these generically (`headers` types
//! each header separately and has no `Accept`), and the grammar needed is a few lines.

use http::header::{GetAll, HeaderValue};

/// Each item of a comma-separated, weighted header (`gzip;q=0.8, br`), as (the item lowercased, its quality).
/// An item without `q` has quality 1; a malformed `q` counts as 1 too, as most servers read it. Values that are
/// not text are skipped.
pub(crate) fn weighted<'a>(values: GetAll<'a, HeaderValue>) -> impl Iterator<Item = (String, f32)> + 'a {
    values
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let quality = parts
                .filter_map(|p| {
                    let p = p.trim();
                    p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="))
                })
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (!name.is_empty()).then_some((name, quality))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderMap, ACCEPT};

    fn read(values: &[&str]) -> Vec<(String, f32)> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(ACCEPT, HeaderValue::from_str(value).unwrap());
        }
        weighted(headers.get_all(ACCEPT)).collect()
    }

    #[test]
    fn items_carry_their_quality_and_default_to_one() {
        assert_eq!(
            read(&["Text/Plain;q=0.5, application/json", "*/*; Q=0"]),
            [
                ("text/plain".into(), 0.5),
                ("application/json".into(), 1.0),
                ("*/*".into(), 0.0)
            ]
        );
    }

    #[test]
    fn empty_items_are_skipped_and_a_bad_quality_counts_as_one() {
        assert_eq!(read(&[" , gzip;q=x,"]), [("gzip".into(), 1.0)]);
    }
}

//! How values appear in log lines. Durations are milliseconds rounded to hundredths (`ms=13.24`): a raw
//! `as_secs_f64() * 1000.0` prints seventeen digits (`13.236635999999999`) that no reader wants and every log
//! pipeline stores.

use std::time::Duration;

/// `duration` in milliseconds, rounded to two decimals.
pub(crate) fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 100_000.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_logged_as_milliseconds_to_two_decimals() {
        assert_eq!(millis(Duration::from_nanos(13_236_635)), 13.24);
        assert_eq!(millis(Duration::from_micros(4)), 0.0);
        assert_eq!(millis(Duration::from_secs(2)), 2000.0);
        assert_eq!(format!("{}", millis(Duration::from_nanos(1_005_000))), "1.01");
    }
}

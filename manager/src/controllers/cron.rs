//! Cron schedules of recurring jobs, in UTC: 5 fields (minute hour day-of-month month
//! day-of-week) or 6 with seconds first. Each field is `*`, a number, a range `a-b`, a list
//! `a,b`, each with an optional step `/n`; day-of-week 0 and 7 are Sunday. As in cron, when
//! both day-of-month and day-of-week are restricted a day matching either fires.

use jiff::{Timestamp, ToSpan, tz::TimeZone};

/// A cron expression that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cron {expr:?}: {reason}")]
pub struct CronError {
    /// The expression.
    pub expr: String,
    /// What is wrong.
    pub reason: String,
}

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_any: bool,
    weekdays_any: bool,
}

/// Bits `lo..=hi` of the field's matching values; whether it was `*`.
fn field(expr: &str, f: &str, what: &str, lo: u32, hi: u32) -> Result<(u64, bool), CronError> {
    let err = |reason: String| CronError {
        expr: expr.to_owned(),
        reason,
    };
    let mut bits = 0u64;
    for part in f.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => match s.parse::<u32>() {
                Ok(n) if n >= 1 => (r, n),
                _ => return Err(err(format!("bad step {s:?} in the {what} field"))),
            },
            None => (part, 1),
        };
        let num = |s: &str| match s.parse::<u32>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(n),
            _ => Err(err(format!("{s:?} is not a {what} in {lo}..={hi}"))),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (num(a)?, num(b)?)
        } else {
            let a = num(range)?;
            (a, if part.contains('/') { hi } else { a })
        };
        if a > b {
            return Err(err(format!("range {range:?} is backwards")));
        }
        let mut x = a;
        while x <= b {
            bits |= 1 << x;
            x += step;
        }
    }
    Ok((bits, f == "*"))
}

impl Schedule {
    /// Reads an expression.
    pub fn parse(expr: &str) -> Result<Schedule, CronError> {
        let f: Vec<&str> = expr.split_whitespace().collect();
        let (sec, rest) = match f.len() {
            5 => ("0", &f[..]),
            6 => (f[0], &f[1..]),
            n => {
                return Err(CronError {
                    expr: expr.to_owned(),
                    reason: format!("{n} fields; want 5 (or 6, seconds first)"),
                });
            }
        };
        let (seconds, _) = field(expr, sec, "second", 0, 59)?;
        let (minutes, _) = field(expr, rest[0], "minute", 0, 59)?;
        let (hours, _) = field(expr, rest[1], "hour", 0, 23)?;
        let (days, days_any) = field(expr, rest[2], "day of month", 1, 31)?;
        let (months, _) = field(expr, rest[3], "month", 1, 12)?;
        let (mut weekdays, weekdays_any) = field(expr, rest[4], "day of week", 0, 7)?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1;
        }
        Ok(Schedule {
            seconds,
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_any,
            weekdays_any,
        })
    }

    fn day_matches(&self, day: i8, weekday: i8) -> bool {
        let d = self.days & (1 << day) != 0;
        let w = self.weekdays & (1 << weekday) != 0;
        match (self.days_any, self.weekdays_any) {
            (false, false) => d || w,
            _ => d && w,
        }
    }

    /// The first time strictly after `after` that matches, within about five years.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let start = after.as_second().checked_add(1)?;
        let t = Timestamp::from_second(start).ok()?.to_zoned(TimeZone::UTC);
        // Walk day by day, hour by hour, minute by minute, skipping what cannot match.
        let mut minute = t.with().second(0).build().ok()?;
        let mut first = true;
        let end = after.as_second().saturating_add(5 * 366 * 86_400);
        while minute.timestamp().as_second() <= end {
            if self.months & (1 << minute.month()) == 0
                || !self.day_matches(minute.day(), minute.weekday().to_sunday_zero_offset())
            {
                minute = minute.start_of_day().ok()?.checked_add(1.day()).ok()?;
            } else if self.hours & (1 << minute.hour()) == 0 {
                minute = minute
                    .with()
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
            } else if self.minutes & (1 << minute.minute()) == 0 {
                minute = minute.checked_add(1.minute()).ok()?;
            } else {
                let from = if first { t.second() } else { 0 };
                if let Some(s) = (from..60).find(|s| self.seconds & (1 << s) != 0) {
                    return minute.with().second(s).build().ok().map(|z| z.timestamp());
                }
                minute = minute.checked_add(1.minute()).ok()?;
            }
            first = false;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn next_times() {
        let s = Schedule::parse("*/5 * * * *").expect("parse");
        assert_eq!(
            s.next_after(ts("2026-11-22T08:03:10Z")),
            Some(ts("2026-11-22T08:05:00Z"))
        );
        assert_eq!(
            s.next_after(ts("2026-11-22T08:05:00Z")),
            Some(ts("2026-11-22T08:10:00Z"))
        );
        let s = Schedule::parse("*/2 * * * * *").expect("parse");
        assert_eq!(
            s.next_after(ts("2026-11-22T08:03:10Z")),
            Some(ts("2026-11-22T08:03:12Z"))
        );
        assert_eq!(
            s.next_after(ts("2026-11-22T08:03:59Z")),
            Some(ts("2026-11-22T08:04:00Z"))
        );
        // 03:00 on weekdays: Sunday 2026-11-22 → Monday.
        let s = Schedule::parse("0 3 * * 1-5").expect("parse");
        assert_eq!(
            s.next_after(ts("2026-11-22T08:00:00Z")),
            Some(ts("2026-11-23T03:00:00Z"))
        );
        // Sunday as 7; day of month OR day of week when both are given.
        let s = Schedule::parse("0 0 1 * 7").expect("parse");
        assert_eq!(
            s.next_after(ts("2026-11-22T08:00:00Z")),
            Some(ts("2026-11-29T00:00:00Z"))
        );
        assert_eq!(
            s.next_after(ts("2026-11-29T00:00:00Z")),
            Some(ts("2026-12-01T00:00:00Z"))
        );
        // Never (February 31st).
        let s = Schedule::parse("0 0 31 2 *").expect("parse");
        assert_eq!(s.next_after(ts("2026-11-22T08:00:00Z")), None);
    }

    #[test]
    fn bad_expressions() {
        for bad in [
            "",
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "5-1 * * * *",
            "*/0 * * * *",
            "a * * * *",
            "* * 0 * *",
            "* * * * * * *",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }
}

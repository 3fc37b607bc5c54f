//! The `strftime_now` template global: Python's `datetime.strftime`, ISO weeks
//! included, on the current UTC time.
//!
//! Templates such as Llama 3.2's put today's date in the system header. The
//! crate has no date-time dependency, so formatting is done here; the calendar
//! arithmetic is `crate::timestamp`'s, the crate's one civil-date implementation.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::Error;

use crate::timestamp::{civil_from_days, days_from_civil};

pub(super) fn strftime_now_fn(
    fixed: Option<i64>,
) -> impl Fn(&str) -> Result<String, Error> + Send + Sync + 'static {
    move |format: &str| {
        let (secs, micros) = match fixed {
            Some(secs) => (secs, 0),
            None => now_unix(),
        };
        Ok(strftime(format, &CivilTime::from_unix(secs, micros)))
    }
}

fn now_unix() -> (i64, u32) {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_micros(),
        ),
        Err(e) => {
            let d = e.duration();
            (-i64::try_from(d.as_secs()).unwrap_or(i64::MAX), 0)
        }
    }
}

/// A UTC calendar time broken into the fields `strftime` needs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CivilTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    micros: u32,
    /// 0 = Sunday.
    weekday: u32,
    /// 0-based day of the year.
    yday: u32,
    unix: i64,
}

impl CivilTime {
    fn from_unix(unix: i64, micros: u32) -> Self {
        let days = unix.div_euclid(86_400);
        let secs = unix.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let weekday = (days + 4).rem_euclid(7) as u32;
        let yday = (days - days_from_civil(year, 1, 1)) as u32;
        Self {
            year,
            month,
            day,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
            micros,
            weekday,
            yday,
            unix,
        }
    }
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// ISO 8601 (year, week) of a date.
fn iso_week(t: &CivilTime) -> (i64, u32) {
    let iso_wday = (t.weekday + 6) % 7 + 1; // Monday = 1
    let week = (i64::from(t.yday) + 1 - i64::from(iso_wday) + 10) / 7;
    let weeks_in = |year: i64| {
        let p =
            |y: i64| (y + y.div_euclid(4) - y.div_euclid(100) + y.div_euclid(400)).rem_euclid(7);
        if p(year) == 4 || p(year - 1) == 3 {
            53u32
        } else {
            52u32
        }
    };
    if week < 1 {
        (t.year - 1, weeks_in(t.year - 1))
    } else if week > i64::from(weeks_in(t.year)) {
        (t.year + 1, 1)
    } else {
        (t.year, week as u32)
    }
}

/// Python's `datetime.strftime` on glibc with the C locale, for a naive
/// time (`%z` and `%Z` are empty). Supports glibc's `-`, `_`, `0` and `^`
/// flags; unknown conversions are copied through, as glibc does.
fn strftime(format: &str, t: &CivilTime) -> String {
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut flag = None;
        while let Some(&f) = chars.peek() {
            if matches!(f, '-' | '_' | '0' | '^' | '#') {
                flag = Some(f);
                chars.next();
            } else {
                break;
            }
        }
        // E and O modifiers are no-ops in the C locale.
        if let Some(&('E' | 'O')) = chars.peek() {
            chars.next();
        }
        let Some(conv) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |out: &mut String, v: i64, width: usize, pad: char| {
            let (width, pad) = match flag {
                Some('-') => (0, pad),
                Some('_') => (width, ' '),
                Some('0') => (width, '0'),
                _ => (width, pad),
            };
            let digits = v.unsigned_abs().to_string();
            if v < 0 {
                out.push('-');
            }
            for _ in digits.len()..width {
                out.push(pad);
            }
            out.push_str(&digits);
        };
        let text = |out: &mut String, s: &str| {
            if flag == Some('^') {
                out.push_str(&s.to_uppercase());
            } else {
                out.push_str(s);
            }
        };
        let hour12 = match t.hour % 12 {
            0 => 12,
            h => h,
        };
        let month_name = MONTHS[(t.month as usize).saturating_sub(1) % 12];
        let weekday_name = WEEKDAYS[t.weekday as usize % 7];
        match conv {
            'a' => text(&mut out, &weekday_name[..3]),
            'A' => text(&mut out, weekday_name),
            'b' | 'h' => text(&mut out, &month_name[..3]),
            'B' => text(&mut out, month_name),
            'c' => text(&mut out, &strftime("%a %b %e %H:%M:%S %Y", t)),
            'C' => num(&mut out, t.year.div_euclid(100), 2, '0'),
            'd' => num(&mut out, i64::from(t.day), 2, '0'),
            'D' | 'x' => out.push_str(&strftime("%m/%d/%y", t)),
            'e' => num(&mut out, i64::from(t.day), 2, ' '),
            'f' => num(&mut out, i64::from(t.micros), 6, '0'),
            'F' => out.push_str(&strftime("%Y-%m-%d", t)),
            'g' => num(&mut out, iso_week(t).0.rem_euclid(100), 2, '0'),
            'G' => num(&mut out, iso_week(t).0, 1, '0'),
            'H' => num(&mut out, i64::from(t.hour), 2, '0'),
            'I' => num(&mut out, i64::from(hour12), 2, '0'),
            'j' => num(&mut out, i64::from(t.yday) + 1, 3, '0'),
            'k' => num(&mut out, i64::from(t.hour), 2, ' '),
            'l' => num(&mut out, i64::from(hour12), 2, ' '),
            'm' => num(&mut out, i64::from(t.month), 2, '0'),
            'M' => num(&mut out, i64::from(t.minute), 2, '0'),
            'n' => out.push('\n'),
            'p' => text(&mut out, if t.hour < 12 { "AM" } else { "PM" }),
            'P' => out.push_str(if t.hour < 12 { "am" } else { "pm" }),
            'r' => out.push_str(&strftime("%I:%M:%S %p", t)),
            'R' => out.push_str(&strftime("%H:%M", t)),
            's' => num(&mut out, t.unix, 1, '0'),
            'S' => num(&mut out, i64::from(t.second), 2, '0'),
            't' => out.push('\t'),
            'T' | 'X' => out.push_str(&strftime("%H:%M:%S", t)),
            'u' => num(&mut out, i64::from((t.weekday + 6) % 7 + 1), 1, '0'),
            'U' => num(&mut out, i64::from((t.yday + 7 - t.weekday) / 7), 2, '0'),
            'V' => num(&mut out, i64::from(iso_week(t).1), 2, '0'),
            'w' => num(&mut out, i64::from(t.weekday), 1, '0'),
            'W' => num(
                &mut out,
                i64::from((t.yday + 7 - (t.weekday + 6) % 7) / 7),
                2,
                '0',
            ),
            'y' => num(&mut out, t.year.rem_euclid(100), 2, '0'),
            'Y' => num(&mut out, t.year, 1, '0'),
            'z' | 'Z' => {}
            '%' => out.push('%'),
            other => {
                out.push('%');
                if let Some(f) = flag {
                    out.push(f);
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::ChatTemplate;
    use super::*;

    #[test]
    fn strftime_now_has_the_right_shape() {
        let t = ChatTemplate::new(
            r#"{{ strftime_now("%d %b %Y") }}|{{ strftime_now("%Y-%m-%d %H:%M:%S") }}|{{ strftime_now is defined }}"#,
            "",
            "",
        )
        .unwrap();
        let out = t.render(&[], false).unwrap();
        let parts: Vec<&str> = out.split('|').collect();
        assert_eq!(parts.len(), 3, "{out}");
        let dmy: Vec<&str> = parts[0].split(' ').collect();
        assert_eq!(dmy.len(), 3, "{out}");
        assert!(
            dmy[0].len() == 2 && dmy[0].chars().all(|c| c.is_ascii_digit()),
            "{out}"
        );
        assert!(MONTHS.iter().any(|m| &m[..3] == dmy[1]), "{out}");
        assert!(
            dmy[2].len() == 4 && dmy[2].chars().all(|c| c.is_ascii_digit()),
            "{out}"
        );
        let iso = parts[1].as_bytes();
        assert_eq!(iso.len(), 19, "{out}");
        for (i, b) in iso.iter().enumerate() {
            match i {
                4 | 7 => assert_eq!(*b, b'-'),
                10 => assert_eq!(*b, b' '),
                13 | 16 => assert_eq!(*b, b':'),
                _ => assert!(b.is_ascii_digit(), "{out}"),
            }
        }
        assert_eq!(parts[2], "True");
    }

    #[test]
    fn strftime_formats_like_python() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = CivilTime::from_unix(1_709_211_909, 42);
        assert_eq!(strftime("%d %b %Y", &t), "29 Feb 2024");
        assert_eq!(
            strftime("%A %B %-d, %Y %I:%M %p", &t),
            "Thursday February 29, 2024 01:05 PM"
        );
        assert_eq!(
            strftime("%j %U %W %w %u %V %G %y %C", &t),
            "060 08 09 4 4 09 2024 24 20"
        );
        assert_eq!(
            strftime("%c|%x|%X|%e|%f|%z%Z|%%|%Q", &t),
            "Thu Feb 29 13:05:09 2024|02/29/24|13:05:09|29|000042||%|%Q"
        );
        assert_eq!(strftime("%^a %_m %F %T", &t), "THU  2 2024-02-29 13:05:09");
        let t = CivilTime::from_unix(0, 0);
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a", &t),
            "1970-01-01 00:00:00 Thu"
        );
        // ISO week belonging to the previous year.
        let t = CivilTime::from_unix(1_609_459_200, 0); // 2021-01-01, a Friday
        assert_eq!(strftime("%G-W%V-%u", &t), "2020-W53-5");
        let t = CivilTime::from_unix(-86_400, 0);
        assert_eq!(strftime("%Y-%m-%d", &t), "1969-12-31");
        let pinned = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "", "")
            .unwrap()
            .with_fixed_now(1_726_395_630);
        assert_eq!(pinned.render(&[], false).unwrap(), "15 Sep 2024");
    }
}

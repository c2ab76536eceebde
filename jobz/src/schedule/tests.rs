use super::*;

fn at(text: &str) -> i64 {
    parse_instant_ms(text).unwrap_or_else(|| panic!("bad instant {text}"))
}

fn utc(ms: i64) -> String {
    Timestamp::from_millisecond(ms).unwrap().to_string()
}

/// Every slot in `(from, to]`, found twice: by enumerating the window and by stepping
/// `next_after` from `from`; both must agree.
fn slots(timing: &Timing, from: &str, to: &str) -> Vec<String> {
    let (from, to) = (at(from), at(to));
    let listed = timing.slots_in(from, to, usize::MAX).latest;
    let mut stepped = Vec::new();
    let mut t = from;
    while let Some(next) = timing.next_after(t).filter(|n| *n <= to) {
        stepped.push(next);
        t = next;
    }
    assert_eq!(
        listed, stepped,
        "slots_in and next_after disagree for {timing}"
    );
    listed.into_iter().map(utc).collect()
}

fn cron(expr: &str) -> Timing {
    Timing::cron(expr, "UTC").unwrap_or_else(|e| panic!("{expr}: {e}"))
}

fn berlin(expr: &str) -> Timing {
    Timing::cron(expr, "Europe/Berlin").unwrap()
}

// 2026-03-01 is a Sunday.
const WEEK: (&str, &str) = ("2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z");

#[test]
fn weekdays_at_nine_fire_monday_to_friday_only() {
    assert_eq!(
        slots(&cron("0 9 * * 1-5"), WEEK.0, WEEK.1),
        [
            "2026-03-02T09:00:00Z",
            "2026-03-03T09:00:00Z",
            "2026-03-04T09:00:00Z",
            "2026-03-05T09:00:00Z",
            "2026-03-06T09:00:00Z",
        ]
    );
    assert_eq!(
        slots(&cron("0 9 * * mon-fri"), WEEK.0, WEEK.1),
        slots(&cron("0 9 * * 1-5"), WEEK.0, WEEK.1)
    );
}

#[test]
fn sunday_is_both_zero_and_seven() {
    // The window starts just after Sunday 1 March, so the week's Sunday is the 8th.
    let (from, to) = ("2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z");
    let sunday = ["2026-03-08T00:00:00Z"];
    assert_eq!(slots(&cron("0 0 * * 0"), from, to), sunday);
    assert_eq!(slots(&cron("0 0 * * 7"), from, to), sunday);
    assert_eq!(slots(&cron("0 0 * * Sun"), from, to), sunday);
    assert_eq!(slots(&cron("@weekly"), from, to), sunday);
    // 7 closes a range the way 0 opens one.
    assert_eq!(slots(&cron("0 0 * * 5-7"), from, to).len(), 3);
    assert_eq!(slots(&cron("0 0 * * 0-6"), from, to).len(), 7);
    assert_eq!(slots(&cron("0 0 * * 1-7"), from, to).len(), 7);
    // Over a whole year, 0 and 7 name the same days.
    let year = ("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z");
    let zero = slots(&cron("0 0 * * 0"), year.0, year.1);
    assert_eq!(zero.len(), 52);
    assert_eq!(zero, slots(&cron("0 0 * * 7"), year.0, year.1));
}

#[test]
fn day_of_month_and_day_of_week_are_ored_when_both_are_restricted() {
    // 2026-06-15 is a Monday, 2026-06-19 a Friday: the 15th fires as a date, the 19th as
    // a Friday.
    assert_eq!(
        slots(
            &cron("0 0 1,15 * 5"),
            "2026-06-14T00:00:00Z",
            "2026-06-21T00:00:00Z"
        ),
        ["2026-06-15T00:00:00Z", "2026-06-19T00:00:00Z"]
    );
    // The whole of June: the 1st, the 15th and every Friday (5, 12, 19, 26).
    let june: Vec<String> = slots(
        &cron("0 0 1,15 * fri"),
        "2026-05-31T23:59:00Z",
        "2026-06-30T23:59:00Z",
    );
    let days: Vec<&str> = june.iter().map(|s| &s[8..10]).collect();
    assert_eq!(days, ["01", "05", "12", "15", "19", "26"]);
    // A field that starts with `*` counts as unrestricted, so `*/2` with a weekday means
    // both (Vixie's DOM_STAR): Mondays on odd dates, 1, 15 and 29 June.
    let odd_mondays = slots(
        &cron("0 0 */2 * 1"),
        "2026-05-31T23:59:00Z",
        "2026-06-30T23:59:00Z",
    );
    let days: Vec<&str> = odd_mondays.iter().map(|s| &s[8..10]).collect();
    assert_eq!(days, ["01", "15", "29"]);
}

#[test]
fn a_daily_berlin_time_in_the_spring_gap_fires_once_at_three() {
    // 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
    assert_eq!(
        slots(
            &berlin("30 2 * * *"),
            "2026-03-26T00:00:00Z",
            "2026-04-02T00:00:00Z"
        ),
        [
            "2026-03-26T01:30:00Z", // 02:30 CET
            "2026-03-27T01:30:00Z",
            "2026-03-28T01:30:00Z",
            "2026-03-29T01:00:00Z", // 03:00 CEST, the first instant after the gap
            "2026-03-30T00:30:00Z", // 02:30 CEST
            "2026-03-31T00:30:00Z",
            "2026-04-01T00:30:00Z",
        ]
    );
}

#[test]
fn a_daily_berlin_time_in_the_autumn_overlap_fires_once() {
    // 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice, fires at the first.
    assert_eq!(
        slots(
            &berlin("30 2 * * *"),
            "2026-10-22T00:00:00Z",
            "2026-10-29T00:00:00Z"
        ),
        [
            "2026-10-22T00:30:00Z", // 02:30 CEST
            "2026-10-23T00:30:00Z",
            "2026-10-24T00:30:00Z",
            "2026-10-25T00:30:00Z", // the first 02:30 (CEST) only
            "2026-10-26T01:30:00Z", // 02:30 CET
            "2026-10-27T01:30:00Z",
            "2026-10-28T01:30:00Z",
        ]
    );
}

#[test]
fn a_wildcard_expression_follows_the_clock_through_both_changes() {
    // `30 * * * *` starts with `*` in the hour: no 02:30 on the spring day, two in autumn.
    let spring = slots(
        &berlin("30 * * * *"),
        "2026-03-29T00:00:00Z",
        "2026-03-29T02:00:00Z",
    );
    assert_eq!(spring, ["2026-03-29T00:30:00Z", "2026-03-29T01:30:00Z"]); // 01:30 CET, 03:30 CEST
    let autumn = slots(
        &berlin("30 * * * *"),
        "2026-10-25T00:00:00Z",
        "2026-10-25T02:00:00Z",
    );
    assert_eq!(autumn, ["2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z"]); // 02:30 twice
}

#[test]
fn fixed_hours_skipped_by_the_spring_change_fire_once_after_it() {
    // 01:00 CET, then 02:00 (skipped) and 03:00 CEST are the same instant: one slot.
    assert_eq!(
        slots(
            &berlin("0 1-3 * * *"),
            "2026-03-28T23:00:00Z",
            "2026-03-29T06:00:00Z"
        ),
        ["2026-03-29T00:00:00Z", "2026-03-29T01:00:00Z"]
    );
    // Autumn: 01:00, 02:00 (first only), 03:00 CET.
    assert_eq!(
        slots(
            &berlin("0 1-3 * * *"),
            "2026-10-24T22:00:00Z",
            "2026-10-25T06:00:00Z"
        ),
        [
            "2026-10-24T23:00:00Z",
            "2026-10-25T00:00:00Z",
            "2026-10-25T02:00:00Z"
        ]
    );
}

#[test]
fn next_after_from_inside_the_repeated_hour() {
    let t = berlin("*/15 * * * *");
    // 02:20 CEST (00:20Z): next is 02:30 CEST, then the second pass starts at 02:00 CET.
    assert_eq!(
        t.next_after(at("2026-10-25T00:20:00Z")).map(utc).unwrap(),
        "2026-10-25T00:30:00Z"
    );
    assert_eq!(
        t.next_after(at("2026-10-25T00:45:00Z")).map(utc).unwrap(),
        "2026-10-25T01:00:00Z"
    );
    // A fixed time already fired in the first pass does not come again in the second.
    let daily = berlin("30 2 * * *");
    assert_eq!(
        daily
            .next_after(at("2026-10-25T00:30:00Z"))
            .map(utc)
            .unwrap(),
        "2026-10-26T01:30:00Z"
    );
}

#[test]
fn nicknames_and_names() {
    assert_eq!(
        slots(
            &cron("@hourly"),
            "2026-03-01T00:00:00Z",
            "2026-03-01T03:00:00Z"
        )
        .len(),
        3
    );
    assert_eq!(slots(&cron("@daily"), WEEK.0, WEEK.1).len(), 7);
    assert_eq!(
        slots(
            &cron("@monthly"),
            "2026-01-01T00:00:00Z",
            "2027-01-01T00:00:00Z"
        )
        .len(),
        12
    );
    assert_eq!(
        slots(
            &cron("@yearly"),
            "2026-01-01T00:00:00Z",
            "2028-01-01T00:00:00Z"
        ),
        ["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"]
    );
    assert_eq!(
        slots(
            &cron("0 0 1 JAN-mar,dec *"),
            "2026-01-01T00:00:00Z",
            "2027-01-01T00:00:00Z"
        )
        .len(),
        4
    );
}

#[test]
fn what_posix_cron_refuses_is_refused() {
    for (expr, says) in [
        ("* * * *", "five fields"),
        ("0 0 0 * * *", "five fields"),
        ("60 * * * *", "outside 0-59"),
        ("0 24 * * *", "outside 0-23"),
        ("0 0 0 * *", "outside 1-31"),
        ("0 0 * 13 *", "outside 1-12"),
        ("0 0 * * 8", "outside 0-7"),
        ("5/15 * * * *", "a step needs"),
        ("*/0 * * * *", "step"),
        ("0 0 5-1 * *", "backwards"),
        ("0 0 L * *", "not a number"),
        ("0 0 ? * *", "not a number"),
        ("0 0 * * 5#2", "not a number"),
        ("0 0 15W * *", "not a number"),
        ("0 0 * * funday", "not a number or a name"),
        ("0 0 1,,2 * *", "empty"),
        ("0 0 30 2 *", "never matches"),
        ("@reboot", "no meaning"),
        ("@fortnightly", "unknown nickname"),
    ] {
        match Timing::cron(expr, "UTC") {
            Ok(t) => panic!("{expr:?} was accepted as {t}"),
            Err(e) => assert!(e.contains(says), "{expr:?}: {e}"),
        }
    }
    assert!(Timing::cron("0 0 * * *", "Mars/Olympus")
        .unwrap_err()
        .contains("unknown time zone"));
    // A leap day is fine: it does come.
    cron("0 0 29 2 *");
}

#[test]
fn every_is_aligned_to_the_epoch_plus_the_offset() {
    let t = Timing::every(2000, 1000).unwrap();
    assert_eq!(t.next_after(0), Some(1000));
    assert_eq!(t.next_after(1000), Some(3000));
    assert_eq!(t.next_after(2999), Some(3000));
    assert_eq!(t.next_after(-1), Some(1000));
    let window = t.slots_in(1000, 11_000, 3);
    assert_eq!(window.total, 5); // 3, 5, 7, 9, 11 s
    assert_eq!(window.latest, [7000, 9000, 11_000]);
    assert_eq!(t.slots_in(1000, 2999, 10), Slots::default());
    assert_eq!(t.slots_in(1000, 5000, usize::MAX).latest, [3000, 5000]);
    assert_eq!(t.to_string(), "every 2s + 1s");
    for (every, offset) in [(500, 0), (1500, 0), (2000, 2000), (2000, 500), (0, 0)] {
        assert!(Timing::every(every, offset).is_err(), "{every} {offset}");
    }
}

#[test]
fn slot_placeholders_render_in_the_schedule_zone() {
    let slot = berlin("30 2 * * *")
        .zoned(at("2026-03-29T01:00:00Z"))
        .unwrap();
    let render = |t: &str| render_slot_value(t, &slot);
    assert_eq!(render("{slot}").unwrap(), "2026-03-29T03:00:00+02:00");
    assert_eq!(render("{slot_date}").unwrap(), "2026-03-29");
    assert_eq!(render("{slot_unix}").unwrap(), "1774746000");
    assert_eq!(render("{slot:%Y_%m_%d}").unwrap(), "2026_03_29");
    assert_eq!(render("day {{x}} {slot:%d}").unwrap(), "day {x} 29");
    assert_eq!(render("plain").unwrap(), "plain");
    assert!(render("{date}")
        .unwrap_err()
        .contains("unknown placeholder"));
    assert!(render("{slot").unwrap_err().contains("unclosed"));
    assert!(render("a}b").unwrap_err().contains("unmatched"));
    assert!(render("{slot:%}").is_err());
}

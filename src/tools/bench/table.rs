//! The report as a markdown table: each measure's figure, its ratio, its target and whether
//! the target is met; a run that `--only` left out shows as skipped.

use super::{Report, streaming, tenants};

/// The report as a table with the targets.
pub fn table(r: &Report) -> String {
    let mut t =
        String::from("| measure | value | ratio | target | |\n| --- | ---: | ---: | --- | --- |\n");
    t += &format!(
        "| {:<42} | {:>16} | {:>14} | {:<9} | |\n",
        "(a) broker ceiling, 1 KiB persistent, confirmed",
        format!("{:.0} msg/s", r.broker_ceiling_msgs_per_s),
        "",
        ""
    );
    t += &row(
        "(b) one replica, 0 ms upstream",
        format!("{:.0} jobs/s", r.fleet_0ms_jobs_per_s),
        format!("{:.2} of a/2", r.fleet_0ms_ratio),
        ">= 0.8",
        r.fleet_0ms_ratio >= 0.8,
    );
    t += &row(
        "(c) one replica, 200 ms upstream, 1000 in flight",
        format!("{:.0} jobs/s", r.fleet_200ms_jobs_per_s),
        format!("{:.2} of ideal", r.fleet_200ms_ratio),
        ">= 0.9",
        r.fleet_200ms_ratio >= 0.9,
    );
    t += &row(
        "(d) latency p50 at 200 jobs/s, 0 ms upstream",
        format!("{:.2} ms", r.latency_p50_ms),
        String::new(),
        "<= 3 ms",
        r.latency_p50_ms <= 3.0,
    );
    t += &row(
        "(d) latency p99",
        format!("{:.2} ms", r.latency_p99_ms),
        String::new(),
        "<= 15 ms",
        r.latency_p99_ms <= 15.0,
    );
    t += &row(
        "(e) worker peak RSS, 1000 in flight",
        format!("{:.1} MiB", r.peak_rss_mib),
        String::new(),
        "<= 64 MiB",
        r.peak_rss_mib <= 64.0,
    );
    t += &row(
        "(f) embeddings batched vs one call each",
        format!(
            "{:.0} / {:.0} items/s",
            r.embeddings_batched_items_per_s, r.embeddings_unbatched_items_per_s
        ),
        format!("{:.1}x", r.embeddings_ratio),
        ">= 5x",
        r.embeddings_ratio >= 5.0,
    );
    t += &row(
        "(g) worker CPU per job during (b)",
        format!("{:.1} µs", r.worker_cpu_us_per_job),
        String::new(),
        "<= 80 µs",
        r.worker_cpu_us_per_job <= 80.0,
    );
    t += &held_rows(r);
    t += &capped_rows(r);
    t += &streaming_rows(r);
    t += &tenants_rows(r);
    t += &cluster_rows(r);
    t
}

/// The rows of (q): the broker's ceiling on the cluster, classic and quorum; llmq's jobs/s
/// with each, and their ratio.
fn cluster_rows(r: &Report) -> String {
    let (classic, quorum) = (
        r.cluster_classic_ceiling_msgs_per_s,
        r.cluster_quorum_ceiling_msgs_per_s,
    );
    let mut t = figure_row(
        "(q) cluster ceiling, classic / quorum queue",
        format!("{classic:.0} / {quorum:.0} msg/s"),
        format!("{:.2} quorum/classic", quorum / classic),
    );
    t += &figure_row(
        "(q) cluster, classic queues, 0 ms upstream",
        format!("{:.0} jobs/s", r.cluster_classic_jobs_per_s),
        format!("{:.1} µs/job", r.cluster_cpu_us_per_job[0]),
    );
    t += &row(
        "(q) cluster, quorum queues, 0 ms upstream",
        format!("{:.0} jobs/s", r.cluster_quorum_jobs_per_s),
        format!("{:.2} of classic", r.cluster_quorum_ratio),
        ">= 0.8",
        r.cluster_quorum_ratio >= 0.8,
    );
    let errors = if r.cluster_classic_jobs_per_s.is_nan() {
        "NaN".to_string()
    } else {
        r.cluster_errors.to_string()
    };
    t += &row(
        "(q) error results",
        errors,
        String::new(),
        "0",
        r.cluster_errors == 0,
    );
    t
}

/// The rows of (h) and (h2): memory with every call in flight, over HTTP/1.1 and HTTP/2.
fn held_rows(r: &Report) -> String {
    let mut t = String::new();
    t += &row(
        &format!("(h) worker peak RSS, {} in flight", r.inflight_reached),
        format!("{:.1} MiB", r.inflight_peak_rss_mib),
        format!("{:.1} MiB at end", r.inflight_peak_rss_end_mib),
        "<= 256 MiB",
        held_ok(
            r.inflight_reached,
            r.inflight_calls,
            r.inflight_peak_rss_mib,
        ),
    );
    t += &row(
        &format!(
            "(h2) worker peak RSS, {} in flight, HTTP/2",
            r.inflight_h2_reached
        ),
        format!("{:.1} MiB", r.inflight_h2_peak_rss_mib),
        format!("{:.1} MiB at end", r.inflight_h2_peak_rss_end_mib),
        "<= 256 MiB",
        held_ok(
            r.inflight_h2_reached,
            r.inflight_calls,
            r.inflight_h2_peak_rss_mib,
        ),
    );
    t
}

/// The rows of (u) and (v): throughput against an unannounced cap, and what it cost.
fn capped_rows(r: &Report) -> String {
    let u = (
        r.capped_jobs_per_s,
        r.capped_ratio,
        r.capped_over_cap,
        r.capped_errors,
    );
    let v = (
        r.capped_told_jobs_per_s,
        r.capped_told_ratio,
        r.capped_told_over_cap,
        r.capped_told_errors,
    );
    let mut t = String::new();
    for (name, (jobs_per_s, ratio, over_cap, errors)) in [
        ("(u) unknown provider cap of 32, 200 ms upstream", u),
        ("(v) the same, refusals with Retry-After: 1", v),
    ] {
        let letter = &name[..3];
        t += &row(
            name,
            format!("{jobs_per_s:.0} ok jobs/s"),
            format!("{ratio:.2} of ideal"),
            ">= 0.85",
            ratio >= 0.85,
        );
        let (value, ok) = match (over_cap, errors) {
            (Some(over_cap), Some(errors)) => (format!("{over_cap} / {errors}"), errors == 0),
            // As `row` knows a run left out.
            _ => ("NaN".to_string(), false),
        };
        t += &row(
            &format!("{letter} 429s over the cap / error results"),
            value,
            String::new(),
            "0 errors",
            ok,
        );
    }
    t
}

/// The rows of (s): deltas/s and the worker's CPU (figures without a target), the time to
/// the first delta, the memory streaming costs, the error results.
fn streaming_rows(r: &Report) -> String {
    let mut t = figure_row(
        &format!(
            "(s) {} streams, a chunk every 50 ms",
            r.stream_concurrency_reached
        ),
        format!("{:.0} deltas/s", r.stream_deltas_per_s),
        format!(
            "{:.2} of {}",
            r.stream_deltas_ratio,
            r.stream_concurrency * 1000 / streaming::CHUNK_MS
        ),
    );
    t += &figure_row(
        "(s) worker CPU while streaming",
        format!("{:.0}% of a core", r.stream_worker_cpu_pct),
        format!("{:.1} µs/delta", r.stream_worker_cpu_us_per_delta),
    );
    t += &row(
        "(s) first chunk to first delta, p50",
        format!("{:.2} ms", r.stream_first_delta_p50_ms),
        format!("p99 {:.2} ms", r.stream_first_delta_p99_ms),
        "< 5 ms",
        r.stream_first_delta_p50_ms < 5.0,
    );
    t += &row(
        "(s) worker peak RSS, streaming / not",
        format!(
            "{:.1} / {:.1} MiB",
            r.stream_peak_rss_mib, r.stream_plain_peak_rss_mib
        ),
        format!("{:.2}x", r.stream_rss_ratio),
        "<= 1.5x",
        r.stream_rss_ratio <= 1.5,
    );
    let (value, ok) = match r.stream_errors {
        Some(errors) => (errors.to_string(), errors == 0),
        None => ("NaN".to_string(), false),
    };
    t += &row("(s) error results", value, String::new(), "0", ok);
    t
}

/// The rows of (t): each scenario with lanes and without, the moves, the error results.
fn tenants_rows(r: &Report) -> String {
    let limit = tenants::LIMIT;
    let mut t = row(
        &format!("(t) even, 200 tenants, 50 ms, {limit} in flight"),
        format!(
            "{:.0} / {:.0} jobs/s",
            r.tenants_even_lanes_jobs_per_s, r.tenants_even_plain_jobs_per_s
        ),
        format!("{:.2} of no lanes", r.tenants_even_ratio),
        &format!(">= {}", tenants::EVEN_GOAL),
        r.tenants_even_ratio >= tenants::EVEN_GOAL,
    );
    t += &figure_row(
        "(t) even: moved to a lane, each lanes run",
        moves(&r.tenants_even_lane_moves),
        String::new(),
    );
    t += &figure_row(
        &format!(
            "(t) noisy: the quiet tenant's {} jobs, p50",
            tenants::QUIET_JOBS
        ),
        format!(
            "{:.0} / {:.0} ms",
            r.tenants_quiet_lanes_p50_ms, r.tenants_quiet_plain_p50_ms
        ),
        format!(
            "p99 {:.0} / {:.0}",
            r.tenants_quiet_lanes_p99_ms, r.tenants_quiet_plain_p99_ms
        ),
    );
    t += &figure_row(
        "(t) noisy: all jobs",
        format!(
            "{:.0} / {:.0} jobs/s",
            r.tenants_noisy_lanes_jobs_per_s, r.tenants_noisy_plain_jobs_per_s
        ),
        format!(
            "{:.2} of no lanes",
            r.tenants_noisy_lanes_jobs_per_s / r.tenants_noisy_plain_jobs_per_s
        ),
    );
    t += &figure_row(
        "(t) noisy: moved to a lane, each lanes run",
        moves(&r.tenants_noisy_lane_moves),
        String::new(),
    );
    t += &row(
        "(t) flood, one sender, 0 ms upstream",
        format!(
            "{:.0} / {:.0} jobs/s",
            r.tenants_flood_lanes_jobs_per_s, r.tenants_flood_plain_jobs_per_s
        ),
        format!("{:.2} of no lanes", r.tenants_flood_ratio),
        &format!(">= {}", tenants::EVEN_GOAL),
        r.tenants_flood_ratio >= tenants::EVEN_GOAL,
    );
    t += &figure_row(
        "(t) flood: moved to a lane, each lanes run",
        moves(&r.tenants_flood_lane_moves),
        String::new(),
    );
    let (value, ok) = match r.tenants_errors {
        Some(errors) => (errors.to_string(), errors == 0),
        None => ("NaN".to_string(), false),
    };
    t += &row("(t) error results", value, String::new(), "0", ok);
    t
}

/// Each run's moves, `?` for one unread; NaN (skipped) without a run.
fn moves(runs: &[Option<u64>]) -> String {
    if runs.is_empty() {
        return "NaN".into();
    }
    let each: Vec<String> = runs
        .iter()
        .map(|m| m.map_or_else(|| "?".to_string(), |m| m.to_string()))
        .collect();
    each.join(" / ")
}

/// A row with a figure and no target (skipped as [`row`] does).
fn figure_row(name: &str, value: String, ratio: String) -> String {
    if value.contains("NaN") {
        return row(name, value, ratio, "", false);
    }
    format!("| {name:<42} | {value:>16} | {ratio:>14} | {:<9} | |\n", "")
}

/// A measured row of the table: what, its figure, a ratio or a second figure, the target
/// and whether it is met.
fn row(name: &str, value: String, ratio: String, target: &str, ok: bool) -> String {
    // A figure of a run that `--only` left out is NaN.
    if value.contains("NaN") {
        return format!(
            "| {name:<42} | {:>16} | {:>14} | {target:<9} | skipped |\n",
            "-", ""
        );
    }
    format!(
        "| {name:<42} | {value:>16} | {ratio:>14} | {target:<9} | {} |\n",
        if ok { "met" } else { "NOT met" }
    )
}

/// (h) and (h2) are met when every call was in flight at once, within 256 MiB.
fn held_ok(reached: u64, calls: u64, peak_rss_mib: f64) -> bool {
    reached > 0 && reached >= calls && peak_rss_mib <= 256.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(calls: u64, h2_reached: u64, h2_rss_mib: f64) -> Report {
        Report {
            broker_ceiling_msgs_per_s: 10_000.0,
            fleet_0ms_jobs_per_s: 4_000.0,
            fleet_0ms_ratio: 0.8,
            fleet_200ms_jobs_per_s: 4_500.0,
            fleet_200ms_ratio: 0.9,
            latency_p50_ms: 2.0,
            latency_p99_ms: 10.0,
            latency_samples: 2_000,
            peak_rss_mib: 50.0,
            embeddings_batched_items_per_s: 5_000.0,
            embeddings_unbatched_items_per_s: 700.0,
            embeddings_ratio: 7.1,
            worker_cpu_us_per_job: 60.0,
            inflight_calls: calls,
            inflight_reached: calls,
            inflight_peak_rss_mib: 200.0,
            inflight_peak_rss_end_mib: 210.0,
            inflight_h2_reached: h2_reached,
            inflight_h2_peak_rss_mib: h2_rss_mib,
            inflight_h2_peak_rss_end_mib: h2_rss_mib + 5.0,
            capped_jobs_per_s: 80.0,
            capped_ratio: 0.5,
            capped_over_cap: Some(1_234),
            capped_errors: Some(0),
            capped_told_jobs_per_s: 150.0,
            capped_told_ratio: 0.94,
            capped_told_over_cap: Some(321),
            capped_told_errors: Some(0),
            stream_concurrency: 300,
            stream_concurrency_reached: 300,
            stream_deltas_per_s: 5_700.0,
            stream_deltas_ratio: 0.95,
            stream_words_per_delta: 1.05,
            stream_worker_cpu_pct: 40.0,
            stream_worker_cpu_us_per_delta: 70.0,
            stream_plain_worker_cpu_pct: 5.0,
            stream_peak_rss_mib: 45.0,
            stream_plain_peak_rss_mib: 36.0,
            stream_rss_ratio: 1.25,
            stream_first_delta_p50_ms: 2.5,
            stream_first_delta_p99_ms: 12.0,
            stream_first_delta_samples: 1_800,
            stream_errors: Some(0),
            tenants_even_lanes_jobs_per_s: 1_900.0,
            tenants_even_plain_jobs_per_s: 1_950.0,
            tenants_even_ratio: 1_900.0 / 1_950.0,
            tenants_even_lane_moves: vec![Some(0), Some(0)],
            tenants_noisy_lanes_jobs_per_s: 1_800.0,
            tenants_noisy_plain_jobs_per_s: 1_900.0,
            tenants_quiet_lanes_p50_ms: 120.0,
            tenants_quiet_lanes_p99_ms: 300.0,
            tenants_quiet_plain_p50_ms: 2_500.0,
            tenants_quiet_plain_p99_ms: 2_600.0,
            tenants_noisy_lane_moves: vec![Some(5_000), None],
            tenants_flood_lanes_jobs_per_s: 2_000.0,
            tenants_flood_plain_jobs_per_s: 4_000.0,
            tenants_flood_ratio: 0.5,
            tenants_flood_lane_moves: vec![Some(11_000), Some(11_500)],
            tenants_errors: Some(0),
            cluster_classic_jobs_per_s: 2_000.0,
            cluster_quorum_jobs_per_s: 1_700.0,
            cluster_quorum_ratio: 0.85,
            cluster_cpu_us_per_job: [70.0, 75.0],
            cluster_errors: 0,
            cluster_classic_ceiling_msgs_per_s: 8_000.0,
            cluster_quorum_ceiling_msgs_per_s: 4_000.0,
        }
    }

    fn h2_row(t: &str) -> &str {
        t.lines()
            .find(|l| l.starts_with("| (h2)"))
            .expect("an (h2) row")
    }

    #[test]
    fn h2_row_is_met_with_every_call_in_flight_within_256_mib() {
        let t = table(&report(10_000, 10_000, 120.0));
        let row = h2_row(&t);
        assert!(
            row.contains("(h2) worker peak RSS, 10000 in flight, HTTP/2"),
            "{row}"
        );
        assert!(
            row.contains("120.0 MiB") && row.contains("125.0 MiB at end"),
            "{row}"
        );
        assert!(row.ends_with("| met |"), "{row}");
    }

    #[test]
    fn a_run_left_out_is_skipped_not_met() {
        let mut r = report(10_000, 10_000, 200.0);
        r.peak_rss_mib = f64::NAN;
        r.worker_cpu_us_per_job = f64::NAN;
        let t = table(&r);
        for name in ["(e) worker peak RSS", "(g) worker CPU"] {
            let line = t.lines().find(|l| l.contains(name)).unwrap_or_default();
            assert!(line.ends_with("| skipped |"), "{line}");
        }
        let h2 = h2_row(&t);
        assert!(h2.ends_with("| met |"), "{h2}");
    }

    fn line<'t>(t: &'t str, start: &str) -> &'t str {
        t.lines().find(|l| l.starts_with(start)).unwrap_or_default()
    }

    #[test]
    fn cluster_rows_compare_quorum_with_classic() {
        let mut r = report(10_000, 10_000, 200.0);
        let t = table(&r);
        let ceiling = line(&t, "| (q) cluster ceiling");
        assert!(
            ceiling.contains("8000 / 4000 msg/s") && ceiling.contains("0.50 quorum/classic"),
            "{ceiling}"
        );
        let classic = line(&t, "| (q) cluster, classic");
        assert!(
            classic.contains("2000 jobs/s") && classic.contains("70.0 µs/job"),
            "{classic}"
        );
        let quorum = line(&t, "| (q) cluster, quorum");
        assert!(
            quorum.contains("1700 jobs/s") && quorum.contains("0.85 of classic"),
            "{quorum}"
        );
        assert!(quorum.ends_with("| met |"), "{quorum}");
        assert!(line(&t, "| (q) error results").ends_with("| met |"));
        r.cluster_quorum_ratio = 0.79;
        r.cluster_errors = 2;
        let t = table(&r);
        assert!(line(&t, "| (q) cluster, quorum").ends_with("| NOT met |"));
        assert!(line(&t, "| (q) error results").ends_with("| NOT met |"));
        // No cluster given: every row skipped.
        r.cluster_classic_jobs_per_s = f64::NAN;
        r.cluster_quorum_jobs_per_s = f64::NAN;
        r.cluster_quorum_ratio = f64::NAN;
        r.cluster_errors = 0;
        let t = table(&r);
        for start in [
            "| (q) cluster, classic",
            "| (q) cluster, quorum",
            "| (q) error",
        ] {
            assert!(line(&t, start).ends_with("| skipped |"), "{t}");
        }
    }

    #[test]
    fn capped_rows_show_the_ratio_the_429s_and_the_errors() {
        let mut r = report(10_000, 10_000, 200.0);
        let t = table(&r);
        let ratio = line(&t, "| (u) unknown provider cap");
        assert!(
            ratio.contains("80 ok jobs/s") && ratio.contains("0.50 of ideal"),
            "{ratio}"
        );
        assert!(ratio.ends_with("| NOT met |"), "{ratio}");
        let cost = line(&t, "| (u) 429s");
        assert!(
            cost.contains("1234 / 0") && cost.ends_with("| met |"),
            "{cost}"
        );
        r.capped_ratio = 0.85;
        r.capped_errors = Some(3);
        let t = table(&r);
        assert!(line(&t, "| (u) unknown").ends_with("| met |"));
        assert!(line(&t, "| (u) 429s").ends_with("| NOT met |"));
        r.capped_jobs_per_s = f64::NAN;
        r.capped_ratio = f64::NAN;
        r.capped_over_cap = None;
        r.capped_errors = None;
        let t = table(&r);
        for start in ["| (u) unknown", "| (u) 429s"] {
            assert!(line(&t, start).ends_with("| skipped |"), "{t}");
        }
    }

    #[test]
    fn streaming_rows_show_the_figures_and_judge_the_two_goals() {
        let mut r = report(10_000, 10_000, 200.0);
        let t = table(&r);
        let rate = line(&t, "| (s) 300 streams");
        assert!(
            rate.contains("5700 deltas/s") && rate.contains("0.95 of 6000"),
            "{rate}"
        );
        assert!(rate.ends_with("| |"), "no target: {rate}");
        let cpu = line(&t, "| (s) worker CPU");
        assert!(cpu.contains("40% of a core") && cpu.contains("70.0 µs/delta"));
        let first = line(&t, "| (s) first chunk");
        assert!(first.contains("2.50 ms") && first.contains("p99 12.00 ms"));
        assert!(first.ends_with("| met |"), "{first}");
        let rss = line(&t, "| (s) worker peak RSS");
        assert!(rss.contains("45.0 / 36.0 MiB") && rss.contains("1.25x"));
        assert!(rss.ends_with("| met |"), "{rss}");
        assert!(line(&t, "| (s) error results").ends_with("| met |"));
        r.stream_first_delta_p50_ms = 5.0;
        r.stream_rss_ratio = 1.6;
        r.stream_errors = Some(2);
        let t = table(&r);
        for start in ["| (s) first chunk", "| (s) worker peak RSS", "| (s) error"] {
            assert!(line(&t, start).ends_with("| NOT met |"), "{t}");
        }
        r.stream_deltas_per_s = f64::NAN;
        r.stream_worker_cpu_pct = f64::NAN;
        r.stream_first_delta_p50_ms = f64::NAN;
        r.stream_peak_rss_mib = f64::NAN;
        r.stream_errors = None;
        let t = table(&r);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| (s)")).collect();
        assert_eq!(rows.len(), 5, "{t}");
        for row in rows {
            assert!(row.ends_with("| skipped |"), "{row}");
        }
    }

    #[test]
    fn tenants_rows_judge_the_even_ratio_and_show_the_rest() {
        let mut r = report(10_000, 10_000, 200.0);
        let t = table(&r);
        let even = line(&t, "| (t) even, 200 tenants");
        assert!(
            even.contains("1900 / 1950 jobs/s") && even.contains("0.97 of no lanes"),
            "{even}"
        );
        assert!(even.ends_with("| met |"), "{even}");
        assert!(line(&t, "| (t) even: moved").contains("0 / 0"));
        let quiet = line(&t, "| (t) noisy: the quiet tenant's 50 jobs");
        assert!(
            quiet.contains("120 / 2500 ms") && quiet.contains("p99 300 / 2600"),
            "{quiet}"
        );
        assert!(quiet.ends_with("| |"), "no target: {quiet}");
        assert!(line(&t, "| (t) noisy: moved").contains("5000 / ?"));
        let flood = line(&t, "| (t) flood, one sender");
        assert!(
            flood.contains("2000 / 4000 jobs/s") && flood.contains("0.50 of no lanes"),
            "{flood}"
        );
        assert!(flood.ends_with("| NOT met |"), "{flood}");
        assert!(line(&t, "| (t) error results").ends_with("| met |"));
        r.tenants_even_ratio = 0.85;
        assert!(line(&table(&r), "| (t) even, 200").ends_with("| NOT met |"));
        for moves in [
            &mut r.tenants_even_lane_moves,
            &mut r.tenants_noisy_lane_moves,
            &mut r.tenants_flood_lane_moves,
        ] {
            moves.clear();
        }
        for figure in [
            &mut r.tenants_even_lanes_jobs_per_s,
            &mut r.tenants_even_ratio,
            &mut r.tenants_noisy_lanes_jobs_per_s,
            &mut r.tenants_quiet_lanes_p50_ms,
            &mut r.tenants_flood_lanes_jobs_per_s,
        ] {
            *figure = f64::NAN;
        }
        r.tenants_errors = None;
        let t = table(&r);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| (t)")).collect();
        assert_eq!(rows.len(), 8, "{t}");
        for row in rows {
            assert!(row.ends_with("| skipped |"), "{row}");
        }
    }

    #[test]
    fn h2_row_is_not_met_short_of_every_call_or_when_not_run() {
        for (reached, rss) in [(200, 120.0), (10_000, 300.0), (0, 0.0)] {
            let t = table(&report(10_000, reached, rss));
            assert!(h2_row(&t).ends_with("| NOT met |"), "{reached}, {rss}");
        }
    }
}

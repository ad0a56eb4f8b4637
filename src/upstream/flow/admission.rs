//! What a call needs to be let in, carried together from the tenant's share to the
//! deployment's slot: its turn, its token estimate, the latest time it may start and what
//! calls it off before it starts.

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::turn::Turn;

/// A call's ticket for admission: the same four values go from [`crate::upstream::call`]
/// through the embedding batcher and the router to [`super::limit::Flow`].
#[derive(Debug, Clone)]
pub struct Admission {
    /// Its place among the waiters: its tenant's share, then its priority.
    pub turn: Turn,
    /// Its token estimate, taken from the deployment's budget before the call.
    pub tokens: u64,
    /// The latest time its call may start (the hand-off time of its delivery); past it the
    /// delivery goes to the retry queue with nothing called.
    pub until: Instant,
    /// What calls it off while it waits.
    pub stop: Stop,
}

/// What calls a waiting call off: its delivery's shutdown, or for a batched call, the
/// shutdowns of every delivery in it (the call is off only once all of them are).
#[derive(Debug, Clone)]
pub enum Stop {
    /// One delivery's.
    One(CancellationToken),
    /// Every one of a batch's.
    All(Vec<CancellationToken>),
}

impl Stop {
    /// Whether the call is off.
    pub fn is_stopped(&self) -> bool {
        match self {
            Stop::One(token) => token.is_cancelled(),
            Stop::All(tokens) => tokens.iter().all(CancellationToken::is_cancelled),
        }
    }

    /// Every token it waits on.
    fn tokens(&self) -> &[CancellationToken] {
        match self {
            Stop::One(token) => std::slice::from_ref(token),
            Stop::All(tokens) => tokens,
        }
    }

    /// Resolves once the call is off.
    pub async fn stopped(&self) {
        match self {
            Stop::One(token) => token.cancelled().await,
            Stop::All(tokens) => {
                futures_util::future::join_all(tokens.iter().map(|t| t.cancelled())).await;
            }
        }
    }
}

impl Admission {
    /// One ticket for a batch of calls made as one: the turn of its most urgent call, the
    /// tokens of all, the earliest time any may start, off once every one is off. `None`
    /// for no call.
    pub fn batch<'a>(each: impl IntoIterator<Item = &'a Admission>) -> Option<Admission> {
        let mut batch: Option<Admission> = None;
        for a in each {
            let Some(b) = batch.as_mut() else {
                batch = Some(Admission {
                    stop: Stop::All(a.stop.tokens().to_vec()),
                    ..a.clone()
                });
                continue;
            };
            // Of equal priorities, the last call's turn.
            if a.turn.priority >= b.turn.priority {
                b.turn = a.turn;
            }
            b.tokens += a.tokens;
            b.until = b.until.min(a.until);
            if let Stop::All(tokens) = &mut b.stop {
                tokens.extend_from_slice(a.stop.tokens());
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ticket(priority: u8, tokens: u64, secs: u64, stop: &CancellationToken) -> Admission {
        Admission {
            turn: Turn::anyone(priority),
            tokens,
            until: Instant::now() + Duration::from_secs(secs),
            stop: Stop::One(stop.clone()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_in_its_most_urgent_turn_until_its_earliest_time_and_stops_with_all() {
        let (a, b) = (CancellationToken::new(), CancellationToken::new());
        let tickets = [ticket(1, 10, 60, &a), ticket(5, 20, 30, &b)];
        let batch = Admission::batch(&tickets).expect("two calls");
        assert_eq!(batch.turn.priority, 5);
        assert_eq!(batch.tokens, 30);
        assert_eq!(batch.until, tickets[1].until);
        a.cancel();
        assert!(!batch.stop.is_stopped(), "one of two calls still wanted");
        b.cancel();
        assert!(batch.stop.is_stopped());
        batch.stop.stopped().await;
        assert!(Admission::batch(&[]).is_none());
    }
}

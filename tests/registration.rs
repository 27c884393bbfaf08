//! The registration bot, black box: `report-relay run` against a real Dovecot and the fake
//! SeaTable and Telegram servers. Updates go in through the fake Bot API; what comes out is the
//! bot's replies, the SeaTable rows and the relayed reports.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use report_relay::bot::texts;
use serde_json::{Map, Value, json};
use support::seatable::FakeSeaTable;
use support::stack::{InProcess, Stack, Tuning, fixture};
use support::telegram::{Call, ChatState, ContactCard, TgChat, TgUser};

/// Every wait. Deliberately shorter than the default `cache_ttl_secs` (60 s): a registration
/// must reach deliveries by refreshing the directory, not by the cache expiring.
const WAIT: Duration = Duration::from_secs(30);

const ANN: i64 = 111_222_333;
const BOB: i64 = 222_333_444;
const CAROL: i64 = 333_444_555;
/// Somebody else whose contact card Ann might share.
const OTHER: i64 = 444_555_666;
/// The group administrator who adds and promotes the bot.
const ADMIN: i64 = 555_666_777;
const BASIC: i64 = -987_654_321;
const SUPER: i64 = -1_001_987_654_321;
const OTHER_SUPER: i64 = -1_001_555_666_777;

/// Ann's number as the administrator typed it, and as Telegram sends it.
const ANN_PHONE_TYPED: &str = "+7 (999) 123-45-67";
const ANN_PHONE_TG: &str = "79991234567";

/// `description` of the stack's default mailbox row.
const SALES: &str = "Sales reports";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn ann() -> TgUser {
    TgUser::new(ANN, "Ann")
}

fn bob() -> TgUser {
    TgUser::new(BOB, "Bob")
}

fn admin() -> TgUser {
    TgUser::new(ADMIN, "Olga").with_username("olga_admin")
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The reply to an accepted contact.
fn registered_reply(mailboxes: &[&str]) -> String {
    format!(
        "{}\n\n{}",
        texts::REGISTERED,
        texts::mailbox_list(&names(mailboxes))
    )
}

/// The reply to a successful (or repeated) group registration.
fn group_registered_reply(title: &str, mailboxes: &[&str]) -> String {
    format!(
        "{}\n\n{}",
        texts::group_registered(title),
        texts::mailbox_list(&names(mailboxes))
    )
}

fn contact_keyboard() -> Value {
    json!({"keyboard": [[{"text": "Share my phone number", "request_contact": true}]],
           "one_time_keyboard": true, "resize_keyboard": true})
}

/// A users row with this phone (as the administrator typed it) and `id_telegram`.
fn add_person(
    stack: &Stack,
    name: &str,
    phone: &str,
    telegram_id: Option<i64>,
    mailboxes: &[&str],
) -> String {
    let row = stack.seatable.add_row(
        "users",
        json!({"Name": name, "phone": phone,
               "id_telegram": telegram_id.map(|id| id.to_string())}),
    );
    stack.seatable.link("users", "mailboxes", &row, mailboxes);
    row
}

/// A t_chats row with exactly these cells.
fn add_group_row(
    stack: &Stack,
    name: &str,
    chat_id: Option<i64>,
    locked: bool,
    mailboxes: &[&str],
) -> String {
    let row = stack.seatable.add_row(
        "t_chats",
        json!({"Name": name, "id_telegram_chat": chat_id.map(|id| id.to_string()),
               "is_locked": locked}),
    );
    stack.seatable.link("t_chats", "mailboxes", &row, mailboxes);
    row
}

/// One more mailbox row, with its own Dovecot account (so the relay can watch it and become
/// ready). An empty description is stored as an empty cell.
fn add_mailbox(stack: &Stack, name: &str, description: &str) -> String {
    let address = format!("{}@test.local", name.to_lowercase());
    stack.dovecot.add_user(&address, "box-secret").unwrap();
    stack.seatable.add_row(
        "mailboxes",
        json!({"Name": name, "email": address, "description": description,
               "imap_password": "box-secret"}),
    )
}

/// The user-visible cells of a row (system fields `_id`, `_mtime`, … left out).
fn cells(stack: &Stack, table: &str, row: &str) -> Map<String, Value> {
    let row = stack
        .seatable
        .row(table, row)
        .unwrap_or_else(|| panic!("{table} has no row {row}"));
    row.into_iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .collect()
}

/// The user-visible cells of every row of a table.
fn table(stack: &Stack, table: &str) -> Vec<Map<String, Value>> {
    stack
        .seatable
        .rows(table)
        .into_iter()
        .map(|row| {
            row.into_iter()
                .filter(|(k, _)| !k.starts_with('_'))
                .collect()
        })
        .collect()
}

/// Waits until every key of `expected` has that value in the row; panics with the row.
async fn expect_cells(stack: &Stack, table: &str, row: &str, expected: Value) {
    let expected = expected.as_object().unwrap().clone();
    let matches = |s: &FakeSeaTable| {
        s.row(table, row)
            .is_some_and(|r| expected.iter().all(|(k, v)| r.get(k) == Some(v)))
    };
    if tokio::time::timeout(WAIT, stack.seatable.wait_until(matches))
        .await
        .is_err()
    {
        panic!(
            "{table} row {row} never became {expected:?}; it is {:?}",
            cells(stack, table, row)
        );
    }
}

/// Starts the relay and waits until it is ready and the bot's long poll is parked.
async fn start(stack: &Stack, mailboxes: usize) -> InProcess {
    let relay = stack.start(&Tuning::default());
    stack.wait_ready(mailboxes).await;
    wait_for_bot(stack).await;
    relay
}

async fn wait_for_bot(stack: &Stack) {
    stack
        .telegram
        .wait_for_long_poll(WAIT)
        .await
        .unwrap_or_else(|e| panic!("the bot never long-polled: {e}"));
}

/// The highest call sequence number so far: calls after it are later than anything seen.
fn mark(stack: &Stack) -> u64 {
    stack
        .telegram
        .calls()
        .iter()
        .map(|c| c.seq)
        .max()
        .unwrap_or(0)
}

fn is_reply_after(call: &Call, chat: i64, after: u64) -> bool {
    call.seq > after && call.method == "sendMessage" && call.chat_id == Some(chat) && call.is_ok()
}

/// The first successful `sendMessage` to `chat` after `after`.
async fn reply_after(stack: &Stack, chat: i64, after: u64) -> Call {
    let calls = stack
        .telegram
        .wait_for(
            |calls| calls.iter().any(|c| is_reply_after(c, chat, after)),
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("no reply in chat {chat}: {e}"));
    calls
        .into_iter()
        .find(|c| is_reply_after(c, chat, after))
        .unwrap()
}

/// Successful `sendMessage` calls to `chat` after `after`.
fn replies_after(stack: &Stack, chat: i64, after: u64) -> Vec<Call> {
    stack
        .telegram
        .calls()
        .into_iter()
        .filter(|c| is_reply_after(c, chat, after))
        .collect()
}

/// Pushes an update from `push` and returns the bot's first reply in `chat` to it.
async fn exchange(stack: &Stack, chat: i64, push: impl FnOnce(&Stack) -> i64) -> Call {
    let before = mark(stack);
    push(stack);
    reply_after(stack, chat, before).await
}

/// Any call carrying `chat` as its chat_id after `after` (whatever the method or outcome).
fn calls_to_after(stack: &Stack, chat: i64, after: u64) -> Vec<Call> {
    stack
        .telegram
        .calls()
        .into_iter()
        .filter(|c| c.seq > after && c.chat_id == Some(chat))
        .collect()
}

/// `#seq method -> outcome` for each call, for failure messages (a Call's Debug holds the
/// uploaded bytes).
fn summary(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            let outcome = if c.is_ok() {
                "ok".to_owned()
            } else {
                format!("{:?} {:?}", c.error_code(), c.error_description())
            };
            format!("#{} {} text={:?} -> {outcome}", c.seq, c.method, c.text)
        })
        .collect()
}

/// Report sends (message-producing calls other than the bot's text replies) to `chat`, any
/// outcome. The fixtures used here are a photo and a PDF, never a text message.
fn report_calls(stack: &Stack, chat: i64) -> Vec<Call> {
    stack
        .telegram
        .calls()
        .into_iter()
        .filter(|c| c.is_send() && c.method != "sendMessage" && c.chat_id == Some(chat))
        .collect()
}

/// Waits until each chat has had at least `n` successful report sends.
async fn wait_reports(stack: &Stack, chats: &[i64], n: usize) {
    let chats = chats.to_vec();
    stack
        .telegram
        .wait_for(
            move |calls| {
                chats.iter().all(|chat| {
                    calls
                        .iter()
                        .filter(|c| {
                            c.is_send()
                                && c.is_ok()
                                && c.method != "sendMessage"
                                && c.chat_id == Some(*chat)
                        })
                        .count()
                        >= n
                })
            },
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("reports did not arrive: {e}"));
}

async fn confirmed(stack: &Stack, update_id: i64) {
    stack
        .telegram
        .wait_update_confirmed(update_id, WAIT)
        .await
        .unwrap_or_else(|e| panic!("the bot did not confirm update {update_id}: {e}"));
}

// ---------------------------------------------------------------------------------------------
// 1. /start, /help, the command menu
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_an_unknown_person_offers_the_contact_button() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    // Carol's row exists but is not registered; nobody has her id.
    add_person(&stack, "Carol", "+7 999 555-44-33", None, &[&mailbox]);
    let relay = start(&stack, 1).await;

    let carol = TgUser::new(CAROL, "Carol");
    let reply = exchange(&stack, CAROL, |s| s.telegram.push_start(&carol)).await;
    assert_eq!(reply.text.as_deref(), Some(texts::START_UNREGISTERED));
    assert_eq!(reply.reply_markup, Some(contact_keyboard()));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_a_registered_person_lists_their_mailboxes() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let marketing = add_mailbox(&stack, "Marketing", "");
    let finance = add_mailbox(&stack, "Finance", "Finance digest");
    // Ann has two rows (e.g. two departments); Sales is linked to both. Links are in no
    // particular order.
    add_person(
        &stack,
        "Ann",
        ANN_PHONE_TYPED,
        Some(ANN),
        &[&sales, &marketing],
    );
    add_person(
        &stack,
        "Ann (finance)",
        "89991234567",
        Some(ANN),
        &[&finance, &sales],
    );
    // Bob is registered but receives nothing yet.
    add_person(&stack, "Bob", "+7 999 765-43-21", Some(BOB), &[]);
    let relay = start(&stack, 3).await;

    let reply = exchange(&stack, ANN, |s| s.telegram.push_start(&ann())).await;
    assert_eq!(
        reply.text.as_deref(),
        Some(texts::mailbox_list(&names(&["Finance digest", "Marketing", SALES])).as_str())
    );
    assert_eq!(reply.reply_markup, None);

    let reply = exchange(&stack, BOB, |s| s.telegram.push_start(&bob())).await;
    assert_eq!(reply.text.as_deref(), Some(texts::NO_MAILBOXES));
    assert_eq!(reply.reply_markup, None);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_and_the_command_menu() {
    let stack = Stack::new().await;
    let relay = start(&stack, 1).await;

    let calls = stack
        .telegram
        .wait_for(
            |calls| {
                calls
                    .iter()
                    .any(|c| c.method == "setMyCommands" && c.is_ok())
            },
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("setMyCommands was never called: {e}"));
    let call = calls
        .iter()
        .rfind(|c| c.method == "setMyCommands" && c.is_ok())
        .unwrap();
    let commands: Value = serde_json::from_str(&call.params["commands"]).unwrap();
    let commands: Vec<&str> = commands
        .as_array()
        .unwrap()
        .iter()
        // The server accepts the command with or without its slash (teloxide sends `/start`);
        // the name is what follows it.
        .map(|c| {
            let command = c["command"].as_str().unwrap();
            command.strip_prefix('/').unwrap_or(command)
        })
        .collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(
        commands.into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from(["help", "start"])
    );

    let reply = exchange(&stack, ANN, |s| {
        s.telegram
            .push_command(&TgChat::private(&ann()), &ann(), "/help")
    })
    .await;
    assert_eq!(reply.text.as_deref(), Some(texts::HELP));
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Which contacts are accepted
// ---------------------------------------------------------------------------------------------

/// Ann (and Bob) on the list, unregistered; `card` is pushed by Ann; the answer must be
/// NOT_YOUR_CONTACT and no users row may change.
async fn contact_is_refused(card: ContactCard) {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    add_person(&stack, "Ann", ANN_PHONE_TYPED, None, &[&mailbox]);
    add_person(&stack, "Other", "+7 999 222-33-44", None, &[&mailbox]);
    let before = table(&stack, "users");
    let relay = start(&stack, 1).await;

    let reply = exchange(&stack, ANN, |s| s.telegram.push_contact(&ann(), card)).await;
    assert_eq!(reply.text.as_deref(), Some(texts::NOT_YOUR_CONTACT));
    assert_eq!(table(&stack, "users"), before, "nothing is written");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_elses_contact_card_is_refused() {
    // The card's number is on the list (Ann's own number, even), but it is Other's card.
    contact_is_refused(ContactCard::other(ANN_PHONE_TG, "Other", Some(OTHER))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_elses_card_with_a_listed_number_is_refused() {
    contact_is_refused(ContactCard::other("79992223344", "Other", Some(OTHER))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_own_contact_is_refused() {
    contact_is_refused(ContactCard::own(&ann(), ANN_PHONE_TG).forwarded_from(&ann())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_forwarded_from_someone_else_is_refused() {
    contact_is_refused(ContactCard::own(&ann(), ANN_PHONE_TG).forwarded_from(&bob())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_without_user_id_is_refused() {
    contact_is_refused(ContactCard::other(ANN_PHONE_TG, "Ann", None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_shared_in_a_group_registers_nobody() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    add_person(&stack, "Ann", ANN_PHONE_TYPED, None, &[&mailbox]);
    let before = table(&stack, "users");
    let relay = start(&stack, 1).await;

    let group = TgChat::group(BASIC, "Coffee corner");
    let update = stack.telegram.push_message(
        &group,
        Some(&ann()),
        json!({"contact": {"phone_number": ANN_PHONE_TG, "first_name": "Ann", "user_id": ANN}}),
    );
    confirmed(&stack, update).await;
    // Updates of one chat are handled in order: once the promotion in the same group is
    // answered, the contact has been handled.
    let barrier = mark(&stack);
    stack.telegram.push_bot_promoted(&group, &admin());
    let not_configured = texts::group_not_configured("Coffee corner");
    stack
        .telegram
        .wait_for(
            |calls| {
                calls.iter().any(|c| {
                    is_reply_after(c, BASIC, barrier) && c.text.as_deref() == Some(&not_configured)
                })
            },
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("no answer to the promotion: {e}"));
    assert_eq!(table(&stack, "users"), before, "nothing is written");
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Phone matching and registration
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_writes_the_id_and_the_next_report_arrives_without_restart() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    let row = add_person(&stack, "Ann", ANN_PHONE_TYPED, None, &[&mailbox]);
    let bob_row = add_person(&stack, "Bob", "+7 999 222-33-44", None, &[&mailbox]);
    let bob_before = cells(&stack, "users", &bob_row);
    let relay = start(&stack, 1).await;

    let reply = exchange(&stack, ANN, |s| {
        s.telegram
            .push_contact(&ann(), ContactCard::own(&ann(), ANN_PHONE_TG))
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(registered_reply(&[SALES]).as_str())
    );
    assert_eq!(reply.reply_markup, Some(json!({"remove_keyboard": true})));
    expect_cells(
        &stack,
        "users",
        &row,
        json!({"Name": "Ann", "phone": ANN_PHONE_TYPED, "id_telegram": ANN.to_string()}),
    )
    .await;
    assert_eq!(cells(&stack, "users", &bob_row), bob_before);

    // The directory was refreshed: the very next report reaches Ann (cache_ttl_secs is 60,
    // longer than WAIT).
    stack.deliver(&fixture("01_chart_png_report.eml")).await;
    wait_reports(&stack, &[ANN], 1).await;
    assert_eq!(report_calls(&stack, ANN).len(), 1);
    assert_eq!(report_calls(&stack, ANN)[0].method, "sendPhoto");

    // And /start now knows her.
    let reply = exchange(&stack, ANN, |s| s.telegram.push_start(&ann())).await;
    assert_eq!(
        reply.text.as_deref(),
        Some(texts::mailbox_list(&names(&[SALES])).as_str())
    );
    assert_eq!(reply.reply_markup, None);
    relay.stop().await;
}

/// A label and how to write a 10-digit national number that way.
type PhoneFormat = (&'static str, fn(&str) -> String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phone_format_matches_both_telegram_formats() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    let typed: [PhoneFormat; 6] = [
        ("+7 (999) 123-45-67", |n| {
            format!("+7 ({}) {}-{}-{}", &n[..3], &n[3..6], &n[6..8], &n[8..])
        }),
        ("8 999 123 45 67", |n| {
            format!("8 {} {} {} {}", &n[..3], &n[3..6], &n[6..8], &n[8..])
        }),
        ("89991234567", |n| format!("8{n}")),
        ("9991234567", |n| n.to_owned()),
        ("+7 999 123-45-67", |n| {
            format!("+7 {} {}-{}-{}", &n[..3], &n[3..6], &n[6..8], &n[8..])
        }),
        ("79991234567", |n| format!("7{n}")),
    ];
    let sent: [PhoneFormat; 2] = [
        ("79991234567", |n| format!("7{n}")),
        ("+79991234567", |n| format!("+7{n}")),
    ];
    struct Case {
        label: String,
        user: TgUser,
        row: String,
        phone_tg: String,
    }
    let mut cases = Vec::new();
    for (i, (typed_label, typed_fmt)) in typed.iter().enumerate() {
        for (j, (sent_label, sent_fmt)) in sent.iter().enumerate() {
            let k = i * sent.len() + j;
            let national = format!("99912345{k:02}");
            let user = TgUser::new(300_000_100 + k as i64, &format!("User {k}"));
            let row = add_person(
                &stack,
                &format!("User {k}"),
                &typed_fmt(&national),
                None,
                &[&mailbox],
            );
            cases.push(Case {
                label: format!("typed like {typed_label:?}, sent like {sent_label:?}"),
                user,
                row,
                phone_tg: sent_fmt(&national),
            });
        }
    }
    let relay = start(&stack, 1).await;

    let before = mark(&stack);
    for case in &cases {
        stack
            .telegram
            .push_contact(&case.user, ContactCard::own(&case.user, &case.phone_tg));
    }
    let expected = registered_reply(&[SALES]);
    let mut failures = Vec::new();
    for case in &cases {
        let reply = reply_after(&stack, case.user.id, before).await;
        if reply.text.as_deref() != Some(expected.as_str()) {
            failures.push(format!("{}: replied {:?}", case.label, reply.text));
            continue;
        }
        let id = cells(&stack, "users", &case.row)["id_telegram"].clone();
        if id != json!(case.user.id.to_string()) {
            failures.push(format!("{}: id_telegram is {id}", case.label));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_national_number_takes_the_configured_country_code() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    let row = add_person(&stack, "Ann", "(202) 555-0143", None, &[&mailbox]);
    let relay = stack.start(&Tuning {
        default_country_code: Some("1"),
        ..Tuning::default()
    });
    stack.wait_ready(1).await;
    wait_for_bot(&stack).await;

    let reply = exchange(&stack, ANN, |s| {
        s.telegram
            .push_contact(&ann(), ContactCard::own(&ann(), "12025550143"))
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(registered_reply(&[SALES]).as_str())
    );
    assert_eq!(reply.reply_markup, Some(json!({"remove_keyboard": true})));
    expect_cells(
        &stack,
        "users",
        &row,
        json!({"phone": "(202) 555-0143", "id_telegram": ANN.to_string()}),
    )
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_not_on_the_list_is_refused_and_nothing_is_written() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    add_person(&stack, "Ann", ANN_PHONE_TYPED, None, &[&mailbox]);
    add_person(&stack, "Dan", "8 999 111 22 33", None, &[&mailbox]);
    let before = table(&stack, "users");
    let relay = start(&stack, 1).await;

    // One digit off Ann's number.
    let reply = exchange(&stack, ANN, |s| {
        s.telegram
            .push_contact(&ann(), ContactCard::own(&ann(), "79991234568"))
    })
    .await;
    assert_eq!(reply.text.as_deref(), Some(texts::NOT_ON_LIST));
    // Dan's national number under another country code is another number.
    let reply = exchange(&stack, BOB, |s| {
        s.telegram
            .push_contact(&bob(), ContactCard::own(&bob(), "+19991112233"))
    })
    .await;
    assert_eq!(reply.text.as_deref(), Some(texts::NOT_ON_LIST));
    assert_eq!(table(&stack, "users"), before, "nothing is written");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rows_with_the_same_number_both_get_the_id() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let marketing = add_mailbox(&stack, "Marketing", "");
    let first = add_person(&stack, "Ann", ANN_PHONE_TYPED, None, &[&sales]);
    let second = add_person(
        &stack,
        "Ann (marketing)",
        "89991234567",
        None,
        &[&marketing, &sales],
    );
    let other = add_person(&stack, "Bob", "+7 999 222-33-44", None, &[&sales]);
    let other_before = cells(&stack, "users", &other);
    let relay = start(&stack, 2).await;

    let reply = exchange(&stack, ANN, |s| {
        s.telegram
            .push_contact(&ann(), ContactCard::own(&ann(), "+79991234567"))
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(registered_reply(&["Marketing", SALES]).as_str())
    );
    assert_eq!(reply.reply_markup, Some(json!({"remove_keyboard": true})));
    expect_cells(
        &stack,
        "users",
        &first,
        json!({"Name": "Ann", "phone": ANN_PHONE_TYPED, "id_telegram": ANN.to_string()}),
    )
    .await;
    expect_cells(
        &stack,
        "users",
        &second,
        json!({"Name": "Ann (marketing)", "phone": "89991234567",
               "id_telegram": ANN.to_string()}),
    )
    .await;
    assert_eq!(cells(&stack, "users", &other), other_before);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_again_with_the_same_id_answers_the_same() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    let row = add_person(&stack, "Ann", ANN_PHONE_TYPED, Some(ANN), &[&mailbox]);
    let before = cells(&stack, "users", &row);
    let relay = start(&stack, 1).await;

    for _ in 0..2 {
        let reply = exchange(&stack, ANN, |s| {
            s.telegram
                .push_contact(&ann(), ContactCard::own(&ann(), ANN_PHONE_TG))
        })
        .await;
        assert_eq!(
            reply.text.as_deref(),
            Some(registered_reply(&[SALES]).as_str())
        );
        assert_eq!(reply.reply_markup, Some(json!({"remove_keyboard": true})));
        assert_eq!(cells(&stack, "users", &row), before);
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_account_overwrites_the_old_id() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    const OLD_ACCOUNT: i64 = 999_888_777;
    let row = add_person(
        &stack,
        "Ann",
        ANN_PHONE_TYPED,
        Some(OLD_ACCOUNT),
        &[&mailbox],
    );
    let relay = start(&stack, 1).await;

    let reply = exchange(&stack, ANN, |s| {
        s.telegram
            .push_contact(&ann(), ContactCard::own(&ann(), ANN_PHONE_TG))
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(registered_reply(&[SALES]).as_str())
    );
    assert_eq!(reply.reply_markup, Some(json!({"remove_keyboard": true})));
    expect_cells(
        &stack,
        "users",
        &row,
        json!({"Name": "Ann", "phone": ANN_PHONE_TYPED, "id_telegram": ANN.to_string()}),
    )
    .await;
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. A person who blocks the bot
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_who_blocked_the_bot_is_skipped_until_their_next_start() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    let ann_row = stack.add_user("Ann", Some(ANN), &[&mailbox]);
    stack.add_user("Bob", Some(BOB), &[&mailbox]);
    let ann_before = cells(&stack, "users", &ann_row);
    let relay = start(&stack, 1).await;

    let blocked_at = mark(&stack);
    let update = stack.telegram.push_bot_blocked(&ann());
    // As Telegram would, the fake now refuses sends to Ann.
    stack.telegram.block_chat(ANN);
    confirmed(&stack, update).await;

    stack.deliver(&fixture("01_chart_png_report.eml")).await;
    wait_reports(&stack, &[BOB], 1).await;
    assert!(
        calls_to_after(&stack, ANN, blocked_at).is_empty(),
        "no attempt to reach Ann while she blocks the bot: {:?}",
        summary(&calls_to_after(&stack, ANN, blocked_at))
    );
    assert_eq!(
        cells(&stack, "users", &ann_row),
        ann_before,
        "the block is not written to SeaTable"
    );

    // Ann unblocks and sends /start.
    stack.telegram.clear_chat_state(ANN);
    let reply = exchange(&stack, ANN, |s| s.telegram.push_start(&ann())).await;
    assert_eq!(
        reply.text.as_deref(),
        Some(texts::mailbox_list(&names(&[SALES])).as_str())
    );
    stack.deliver(&fixture("03_dashboard_pdf_report.eml")).await;
    wait_reports(&stack, &[ANN, BOB], 1).await;
    wait_reports(&stack, &[BOB], 2).await;

    // Deliveries to one chat are in order, so an attempt at the first report would have come
    // before the second one: Ann got only the second, and nothing at all while blocked.
    let to_ann = report_calls(&stack, ANN);
    assert_eq!(to_ann.len(), 1, "{:?}", summary(&to_ann));
    assert_eq!(to_ann[0].method, "sendDocument");
    assert!(
        calls_to_after(&stack, ANN, blocked_at)
            .iter()
            .all(|c| c.seq >= reply.seq),
        "no call to Ann before her /start: {:?}",
        summary(&calls_to_after(&stack, ANN, blocked_at))
    );
    assert_eq!(cells(&stack, "users", &ann_row), ann_before);
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Groups: promotion
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoting_the_bot_in_a_group_binds_the_free_row() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let marketing = add_mailbox(&stack, "Marketing", "");
    let row = add_group_row(&stack, "Sales team", None, false, &[&sales, &marketing]);
    let other = add_group_row(&stack, "Finance", None, false, &[&sales]);
    let other_before = cells(&stack, "t_chats", &other);
    let relay = start(&stack, 2).await;

    let group = TgChat::group(BASIC, "Sales team");
    let reply = exchange(&stack, BASIC, |s| {
        s.telegram.push_bot_promoted(&group, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(group_registered_reply("Sales team", &["Marketing", SALES]).as_str())
    );
    expect_cells(
        &stack,
        "t_chats",
        &row,
        json!({"Name": "Sales team", "id_telegram_chat": "-987654321", "is_locked": true}),
    )
    .await;
    assert_eq!(cells(&stack, "t_chats", &other), other_before);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supergroup_added_directly_as_administrator_binds_the_free_row() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let row = add_group_row(&stack, "Sales team", None, false, &[&sales]);
    let relay = start(&stack, 1).await;

    let group = TgChat::supergroup(SUPER, "Sales team");
    let reply = exchange(&stack, SUPER, |s| {
        s.telegram.push_bot_added_as_admin(&group, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(group_registered_reply("Sales team", &[SALES]).as_str())
    );
    expect_cells(
        &stack,
        "t_chats",
        &row,
        json!({"Name": "Sales team", "id_telegram_chat": "-1001987654321", "is_locked": true}),
    )
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_match_after_trimming_and_collapsing_whitespace() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let row = add_group_row(&stack, " Sales  team ", None, false, &[&sales]);
    let relay = start(&stack, 1).await;

    let group = TgChat::supergroup(SUPER, "Sales   team  ");
    let reply = exchange(&stack, SUPER, |s| {
        s.telegram.push_bot_promoted(&group, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(group_registered_reply("Sales team", &[SALES]).as_str())
    );
    expect_cells(
        &stack,
        "t_chats",
        &row,
        json!({"Name": " Sales  team ", "id_telegram_chat": "-1001987654321", "is_locked": true}),
    )
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_title_with_no_row_is_not_configured() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    add_group_row(&stack, "Sales team", None, false, &[&sales]);
    add_group_row(&stack, "Marketing", None, false, &[&sales]);
    let before = table(&stack, "t_chats");
    let relay = start(&stack, 1).await;

    let group = TgChat::group(BASIC, "  Marketing   weekly ");
    let reply = exchange(&stack, BASIC, |s| {
        s.telegram.push_bot_promoted(&group, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(texts::group_not_configured("Marketing weekly").as_str())
    );
    assert_eq!(table(&stack, "t_chats"), before);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_are_case_sensitive() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    add_group_row(&stack, "Sales team", None, false, &[&sales]);
    let before = table(&stack, "t_chats");
    let relay = start(&stack, 1).await;

    let group = TgChat::group(BASIC, "sales team");
    let reply = exchange(&stack, BASIC, |s| {
        s.telegram.push_bot_promoted(&group, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(texts::group_not_configured("sales team").as_str())
    );
    assert_eq!(table(&stack, "t_chats"), before);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rows_with_the_title_are_ambiguous() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    add_group_row(&stack, "Sales team", None, false, &[&sales]);
    add_group_row(&stack, "Sales team", None, false, &[&sales]);
    let before = table(&stack, "t_chats");
    let relay = start(&stack, 1).await;

    let group = TgChat::supergroup(SUPER, "Sales team");
    let reply = exchange(&stack, SUPER, |s| {
        s.telegram.push_bot_promoted(&group, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(texts::group_ambiguous("Sales team").as_str())
    );
    assert_eq!(table(&stack, "t_chats"), before, "nothing is written");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoting_again_in_the_bound_chat_is_an_idempotent_success() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let row = add_group_row(&stack, "Sales team", Some(SUPER), true, &[&sales]);
    let before = cells(&stack, "t_chats", &row);
    let relay = start(&stack, 1).await;

    let group = TgChat::supergroup(SUPER, "Sales team");
    let reply = exchange(&stack, SUPER, |s| {
        s.telegram.push_bot_promoted(&group, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(group_registered_reply("Sales team", &[SALES]).as_str())
    );
    assert_eq!(cells(&stack, "t_chats", &row), before);
    relay.stop().await;
}

/// A row named "Sales team" with these cells; the bot is promoted in another chat with that
/// title; the answer is group_taken and the row is unchanged.
async fn a_taken_row_is_refused(chat_id: Option<i64>, locked: bool) {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let row = add_group_row(&stack, "Sales team", chat_id, locked, &[&sales]);
    let before = cells(&stack, "t_chats", &row);
    let relay = start(&stack, 1).await;

    let group = TgChat::supergroup(SUPER, "Sales team");
    let reply = exchange(&stack, SUPER, |s| {
        s.telegram.push_bot_promoted(&group, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(texts::group_taken("Sales team").as_str())
    );
    assert_eq!(cells(&stack, "t_chats", &row), before);
    assert_eq!(before["is_locked"], json!(locked));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_bound_and_locked_to_another_chat_is_taken() {
    a_taken_row_is_refused(Some(OTHER_SUPER), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_bound_to_another_chat_without_the_lock_is_taken() {
    a_taken_row_is_refused(Some(OTHER_SUPER), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_row_locked_without_an_id_is_taken() {
    a_taken_row_is_refused(None, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_chat_with_the_same_title_is_refused() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let row = add_group_row(&stack, "Sales team", None, false, &[&sales]);
    let relay = start(&stack, 1).await;

    let first = TgChat::group(BASIC, "Sales team");
    let reply = exchange(&stack, BASIC, |s| {
        s.telegram.push_bot_promoted(&first, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(group_registered_reply("Sales team", &[SALES]).as_str())
    );
    expect_cells(
        &stack,
        "t_chats",
        &row,
        json!({"Name": "Sales team", "id_telegram_chat": "-987654321", "is_locked": true}),
    )
    .await;
    let bound = cells(&stack, "t_chats", &row);

    let second = TgChat::supergroup(OTHER_SUPER, "Sales team");
    let reply = exchange(&stack, OTHER_SUPER, |s| {
        s.telegram.push_bot_promoted(&second, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(texts::group_taken("Sales team").as_str())
    );
    assert_eq!(cells(&stack, "t_chats", &row), bound);
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Groups: added as a member, removed, kicked
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_as_a_plain_member_asks_to_be_promoted() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let row = add_group_row(&stack, "Sales team", None, false, &[&sales]);
    let before = cells(&stack, "t_chats", &row);
    let relay = start(&stack, 1).await;

    let group = TgChat::group(BASIC, "Sales team");
    let reply = exchange(&stack, BASIC, |s| {
        s.telegram.push_bot_added(&group, &admin())
    })
    .await;
    assert_eq!(reply.text.as_deref(), Some(texts::ADDED_AS_MEMBER));
    assert_eq!(cells(&stack, "t_chats", &row), before);
    relay.stop().await;
}

/// The registered group loses the bot (`kicked` or `left`): no reply, the next report skips it,
/// and once it is promoted again it gets the following report.
async fn a_removed_group_is_skipped_until_promoted_again(kicked: bool) {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let row = add_group_row(&stack, "Sales team", Some(SUPER), true, &[&sales]);
    stack.add_user("Bob", Some(BOB), &[&sales]);
    let before = cells(&stack, "t_chats", &row);
    let relay = start(&stack, 1).await;

    let group = TgChat::supergroup(SUPER, "Sales team");
    let removed_at = mark(&stack);
    let update = if kicked {
        let update = stack.telegram.push_bot_kicked(&group, &admin());
        stack.telegram.set_chat_state(SUPER, ChatState::Kicked);
        update
    } else {
        let update = stack.telegram.push_bot_left(&group, &admin());
        stack.telegram.set_chat_state(SUPER, ChatState::NotMember);
        update
    };
    confirmed(&stack, update).await;

    stack.deliver(&fixture("01_chart_png_report.eml")).await;
    wait_reports(&stack, &[BOB], 1).await;
    assert!(
        calls_to_after(&stack, SUPER, removed_at).is_empty(),
        "nothing goes to the group after it removed the bot: {:?}",
        summary(&calls_to_after(&stack, SUPER, removed_at))
    );

    // Re-added as administrator. Updates of one chat are handled in order, so once this is
    // answered the removal was handled too, and it was not answered.
    stack.telegram.clear_chat_state(SUPER);
    let reply = exchange(&stack, SUPER, |s| {
        s.telegram.push_bot_added_as_admin(&group, &admin())
    })
    .await;
    assert_eq!(
        reply.text.as_deref(),
        Some(group_registered_reply("Sales team", &[SALES]).as_str())
    );
    assert_eq!(
        replies_after(&stack, SUPER, removed_at).len(),
        1,
        "no reply to the removal"
    );
    assert!(
        calls_to_after(&stack, SUPER, removed_at)
            .iter()
            .all(|c| c.seq >= reply.seq),
        "no call to the group while the bot was out: {:?}",
        summary(&calls_to_after(&stack, SUPER, removed_at))
    );

    stack.deliver(&fixture("03_dashboard_pdf_report.eml")).await;
    wait_reports(&stack, &[SUPER], 1).await;
    wait_reports(&stack, &[BOB], 2).await;
    let to_group = report_calls(&stack, SUPER);
    assert_eq!(
        to_group.len(),
        1,
        "only the report after re-adding: {:?}",
        summary(&to_group)
    );
    assert_eq!(to_group[0].method, "sendDocument");
    assert_eq!(cells(&stack, "t_chats", &row), before);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_removed_the_bot_is_skipped_until_promoted_again() {
    a_removed_group_is_skipped_until_promoted_again(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_kicked_the_bot_is_skipped_until_promoted_again() {
    a_removed_group_is_skipped_until_promoted_again(true).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Groups: basic group → supergroup migration
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_migrates_when_the_bot_is_promoted_registers_its_new_id() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let row = add_group_row(&stack, "Sales team", None, false, &[&sales]);
    let relay = start(&stack, 1).await;

    // Added as a member of the basic group first.
    let basic = TgChat::group(BASIC, "Sales team");
    let reply = exchange(&stack, BASIC, |s| {
        s.telegram.push_bot_added(&basic, &admin())
    })
    .await;
    assert_eq!(reply.text.as_deref(), Some(texts::ADDED_AS_MEMBER));

    // Promoting the bot converts the group: the migration messages, then the promotion as seen
    // from the new supergroup.
    let before = mark(&stack);
    stack.telegram.push_migration(&basic, SUPER, &admin());
    let supergroup = TgChat::supergroup(SUPER, "Sales team");
    stack.telegram.push_bot_promoted(&supergroup, &admin());
    let reply = reply_after(&stack, SUPER, before).await;
    let expected = group_registered_reply("Sales team", &[SALES]);
    assert_eq!(reply.text.as_deref(), Some(expected.as_str()));
    expect_cells(
        &stack,
        "t_chats",
        &row,
        json!({"Name": "Sales team", "id_telegram_chat": "-1001987654321", "is_locked": true}),
    )
    .await;
    let to_old: Vec<_> = calls_to_after(&stack, BASIC, before)
        .into_iter()
        .filter(|c| c.text.as_deref() == Some(expected.as_str()))
        .collect();
    assert!(
        to_old.is_empty(),
        "the success reply goes to the new chat: {:?}",
        summary(&to_old)
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_alone_moves_a_bound_row_to_the_new_id() {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let row = add_group_row(&stack, "Sales team", Some(BASIC), true, &[&sales]);
    let other = add_group_row(&stack, "Finance", Some(OTHER_SUPER), true, &[&sales]);
    let other_before = cells(&stack, "t_chats", &other);
    let relay = start(&stack, 1).await;

    let basic = TgChat::group(BASIC, "Sales team");
    let (_, second) = stack.telegram.push_migration(&basic, SUPER, &admin());
    confirmed(&stack, second).await;
    expect_cells(
        &stack,
        "t_chats",
        &row,
        json!({"Name": "Sales team", "id_telegram_chat": "-1001987654321", "is_locked": true}),
    )
    .await;
    assert_eq!(cells(&stack, "t_chats", &other), other_before);
    relay.stop().await;
}

/// A row bound to the basic group (the bot was promoted there earlier); the group converts and
/// Telegram reports the bot's administrator status from the new supergroup: same row, new id,
/// an idempotent success in the new chat (not group_taken).
async fn a_bound_group_that_migrates_keeps_its_row(promotion_first: bool) {
    let stack = Stack::new().await;
    let sales = stack.mailbox_row.clone();
    let row = add_group_row(&stack, "Sales team", Some(BASIC), true, &[&sales]);
    let relay = start(&stack, 1).await;

    let basic = TgChat::group(BASIC, "Sales team");
    let supergroup = TgChat::supergroup(SUPER, "Sales team");
    let before = mark(&stack);
    if promotion_first {
        stack.telegram.push_bot_promoted(&supergroup, &admin());
        stack.telegram.push_migration(&basic, SUPER, &admin());
    } else {
        stack.telegram.push_migration(&basic, SUPER, &admin());
        stack.telegram.push_bot_promoted(&supergroup, &admin());
    }
    let reply = reply_after(&stack, SUPER, before).await;
    assert_eq!(
        reply.text.as_deref(),
        Some(group_registered_reply("Sales team", &[SALES]).as_str())
    );
    expect_cells(
        &stack,
        "t_chats",
        &row,
        json!({"Name": "Sales team", "id_telegram_chat": "-1001987654321", "is_locked": true}),
    )
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_group_migrating_then_reporting_the_promotion_keeps_its_row() {
    a_bound_group_that_migrates_keeps_its_row(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_group_reporting_the_promotion_before_the_migration_keeps_its_row() {
    a_bound_group_that_migrates_keeps_its_row(true).await;
}

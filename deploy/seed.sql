-- The seed tutorials' tables and rows, for the compose stack.
CREATE TABLE IF NOT EXISTS users (id integer PRIMARY KEY, name varchar(100), age integer);
CREATE TABLE IF NOT EXISTS books (
  book_id integer PRIMARY KEY, book_price numeric, genre varchar(50), book_name varchar(100)
);
INSERT INTO users VALUES (1, 'Jane Roe', 25) ON CONFLICT DO NOTHING;
INSERT INTO books VALUES
  (1, 12.2, 'fiction', 'Old age'),
  (2, 13.2, 'non-fiction', 'Saturn rings'),
  (3, 121.6, 'fiction', 'Supernova'),
  (4, 100, 'non-fiction', 'History of the world'),
  (5, 1112.2, 'fiction', 'Sun city')
ON CONFLICT DO NOTHING;
